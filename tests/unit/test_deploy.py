"""deploy/: the Kubernetes manifests, the Docker image, the Grafana dashboard, checked offline against the code.

The kustomizations are rendered with `kubectl kustomize` when kubectl is installed (those tests skip otherwise); the
files they are made of are parsed with PyYAML either way, so the cluster configs, the cross-file consistency checks
and the dashboard always run. Nothing here needs a cluster, a network or Docker.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml
from prometheus_client.utils import floatToGoString

from pdserve.config import ClusterConfig, Mode, load_config
from pdserve.worker.metrics_server import LATENCY_BUCKETS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAYS = {"cpu-smollm2": K8S / "overlays" / "cpu-smollm2", "gpu-llama3-8b": K8S / "overlays" / "gpu-llama3-8b"}
KUSTOMIZATIONS = {"base": BASE, **OVERLAYS}
CONFIG_PATH = "/etc/pdserve/cluster.yaml"
"""Where the head container's command reads the cluster config (a ConfigMap mounted as a folder)."""
USER_CREATED = {("Secret", "pdserve-token"), ("Secret", "hf-token")}
"""Objects the manifests use but a person makes (with a token in it); deploy/README.md says how."""
GPU = "nvidia.com/gpu"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH: the kustomizations are not "
                                                            "rendered (their files are still parsed one by one)")


# ---- loading ---------------------------------------------------------------------------------------------------


@cache
def render(name: str) -> tuple[dict, ...]:
    """`kubectl kustomize` of one kustomization: every document it renders."""
    out = subprocess.run([KUBECTL, "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, f"kubectl kustomize {name} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d is not None)


def manifest_files() -> list[Path]:
    """Every Kubernetes YAML under deploy/k8s (the kustomizations' own files and the cluster configs are not)."""
    skip = {"kustomization.yaml", "kustomizeconfig.yaml", "cluster.yaml"}
    return sorted(p for p in K8S.rglob("*.yaml") if p.name not in skip)


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def of_kind(documents, kind: str) -> list[dict]:
    return [d for d in documents if d["kind"] == kind]


def raycluster_pods(rc: dict) -> list[tuple[str, dict, dict]]:
    """(group name, rayStartParams, pod spec) of the head group and each worker group."""
    head = rc["spec"]["headGroupSpec"]
    groups = [("head", head.get("rayStartParams", {}), head["template"]["spec"])]
    for g in rc["spec"].get("workerGroupSpecs", []):
        groups.append((g["groupName"], g.get("rayStartParams", {}), g["template"]["spec"]))
    return groups


def pod_specs(documents) -> list[tuple[str, dict]]:
    """(where, pod spec) of every Deployment, Job and RayCluster group."""
    specs = []
    for d in documents:
        if d["kind"] in ("Deployment", "Job"):
            specs.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d["kind"] == "RayCluster":
            specs += [(f"RayCluster/{d['metadata']['name']}:{g}", s) for g, _, s in raycluster_pods(d)]
    return specs


def quantity(value) -> float:
    """A Kubernetes CPU or count quantity as a number ("500m" -> 0.5)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def config_text(documents) -> str:
    [cm] = [c for c in of_kind(documents, "ConfigMap") if c["metadata"]["name"].startswith("pdserve-config")]
    return cm["data"]["cluster.yaml"]


def load(text: str, tmp_path: Path) -> ClusterConfig:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return load_config(str(path))  # raises ConfigError naming the field if the shipped config is wrong


def head_container(rc: dict) -> dict:
    [c] = [c for c in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"] if c["name"] == "ray-head"]
    return c


# ---- every file, parsed directly (always runs) -----------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_parses_and_is_named(path: Path) -> None:
    documents = docs(path)
    assert documents, f"{path} has no document"
    for d in documents:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), f"{path}: {d}"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_lists_files_that_exist_and_documents_its_knobs(name: str) -> None:
    folder = KUSTOMIZATIONS[name]
    text = (folder / "kustomization.yaml").read_text()
    assert text.startswith("#") and "change" in text.split("apiVersion")[0].lower(), \
        f"{name}: kustomization.yaml should open with a comment on the values a user changes"
    k = yaml.safe_load(text)
    for entry in k.get("resources", []):
        assert (folder / entry).exists(), f"{name}: resource {entry} is missing"
    for generator in k.get("configMapGenerator", []):
        for f in generator.get("files", []):
            assert (folder / f).exists(), f"{name}: {f} is missing"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_cluster_config_loads_and_reaches_the_cluster(name: str) -> None:
    config = load_config(str(KUSTOMIZATIONS[name] / "cluster.yaml"))
    assert config.router.host == "0.0.0.0", "the router must listen beyond the pod for its Service to reach it"
    assert config.router.http_port is not None, "the readiness probe is GET /health on the HTTP port"
    assert config.router.token_file, "a router reachable from the cluster network needs a bearer token"
    assert config.ray_address == "auto", "the router joins the Ray head its own pod started"
    [redis] = of_kind(docs(BASE / "redis.yaml"), "Service")
    assert config.redis_url == f"redis://{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}/0"


def test_ray_cluster_example_config_loads() -> None:
    config = load_config(str(DEPLOY / "ray" / "cluster.yaml"))
    assert config.ray_address == "auto" and config.kv_transfer.backend == "nccl"
    assert config.redis_url and "127.0.0.1" not in config.redis_url, "workers on other nodes must reach Redis"


@pytest.mark.parametrize("name, device, backend", [("gpu-llama3-8b", "cuda", "nccl"), ("cpu-smollm2", "cpu", "gloo")])
def test_overlay_config_fits_its_hardware(name: str, device: str, backend: str) -> None:
    config = load_config(str(OVERLAYS[name] / "cluster.yaml"))
    assert config.engine.device == device and config.kv_transfer.backend == backend
    gpus = {config.workers.prefill.resources.gpus, config.workers.decode.resources.gpus}
    assert (min(gpus) >= 1) if device == "cuda" else (gpus == {0})
    if device == "cuda":
        assert config.engine.model.startswith("/models/"), "the weights come from the volume mounted at /models"


def test_user_created_objects_are_documented() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for kind, name in USER_CREATED:
        assert re.search(rf"kubectl .*create secret generic {name}\b", readme), \
            f"deploy/README.md should say how to create the {kind} {name}"


# ---- the rendered kustomizations (kubectl) ---------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_render_has_the_pieces(name: str) -> None:
    documents = render(name)
    for d in documents:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents}
    assert ("Deployment", "pdserve-redis") in kinds and ("Service", "pdserve-redis") in kinds
    assert ("Service", "pdserve-router") in kinds
    [rc] = of_kind(documents, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    if name != "base":
        assert {d["metadata"].get("namespace") for d in documents} == {"pdserve"}


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_container_has_an_image_and_limits(name: str) -> None:
    for where, spec in pod_specs(render(name)):
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c.get("image"), f"{where}/{c['name']}: no image"
            limits = c.get("resources", {}).get("limits", {})
            assert "cpu" in limits and "memory" in limits, f"{where}/{c['name']}: no cpu/memory limits"


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_config_loads_and_its_ports_match_service_containers_and_probe(name: str, tmp_path: Path) -> None:
    documents = render(name)
    config = load(config_text(documents), tmp_path)
    want = {"grpc": config.router.port, "http": config.router.http_port}
    [rc] = of_kind(documents, "RayCluster")
    head = head_container(rc)
    container_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    for port_name, number in want.items():
        assert container_ports.get(port_name) == number, f"{name}: container port {port_name}"
    [service] = [s for s in of_kind(documents, "Service") if s["metadata"]["name"] == "pdserve-router"]
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(service_ports) == set(want)
    for port_name, number in want.items():
        target = service_ports[port_name]["targetPort"]
        assert service_ports[port_name]["port"] == number
        assert container_ports.get(target, target) == number, f"{name}: Service port {port_name} -> {target}"
    assert service["spec"]["selector"] == {"ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": "head"}
    annotations = service["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.router.http_port
    probe = head["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    assert container_ports.get(probe["port"], probe["port"]) == config.router.http_port


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_head_runs_pdserve_on_the_mounted_config(name: str) -> None:
    [rc] = of_kind(render(name), "RayCluster")
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = head_container(rc)
    assert CONFIG_PATH in " ".join(head["command"] + head["args"]) and "pdserve-ray-head" in head["args"][0]
    config_volume = {m["name"]: m["mountPath"] for m in head["volumeMounts"]}["pdserve-config"]
    assert os.path.dirname(CONFIG_PATH) == config_volume
    [group] = [s for g, _, s in raycluster_pods(rc) if g == "head"]
    [volume] = [v for v in group["volumes"] if v["name"] == "pdserve-config"]
    assert {"key": "cluster.yaml", "path": os.path.basename(CONFIG_PATH)} in volume["configMap"]["items"]
    assert rc["spec"]["authOptions"]["mode"] == "token", "KubeRay hands Ray's token to every pod, the router's too"
    head_params = rc["spec"]["headGroupSpec"]["rayStartParams"]
    assert head_params["num-cpus"] == "0", "worker actors must not land on the router's pod"
    for _, _, spec in raycluster_pods(rc)[1:]:
        [worker] = spec["containers"]
        assert "$KUBERAY_GEN_RAY_START_CMD" in worker["args"][0], "with the annotation, workers must run ray start"


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_worker_pods_have_room_for_every_worker(name: str, tmp_path: Path) -> None:
    documents = render(name)
    config = load(config_text(documents), tmp_path)
    pools = [config.workers.colocated] if config.mode is Mode.COLOCATED else [config.workers.prefill,
                                                                                config.workers.decode]
    [rc] = of_kind(documents, "RayCluster")
    cpus = gpus = 0.0
    for group in rc["spec"]["workerGroupSpecs"]:
        [c] = group["template"]["spec"]["containers"]
        limits = c["resources"]["limits"]
        pod_cpus = quantity(group["rayStartParams"].get("num-cpus", limits["cpu"]))
        pod_gpus = quantity(limits.get(GPU, 0))
        assert pod_cpus <= quantity(limits["cpu"]), "Ray is offered more CPUs than the pod may use"
        assert quantity(c["resources"]["requests"].get(GPU, 0)) == pod_gpus
        for pool in pools:  # each worker is one actor: it must fit in one pod
            assert pool.resources.cpus <= pod_cpus and pool.resources.gpus <= pod_gpus, f"{name}: {pool}"
        cpus += group["replicas"] * pod_cpus
        gpus += group["replicas"] * pod_gpus
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert sum(p.count * p.resources.cpus for p in pools) <= cpus, f"{name}: not enough Ray CPUs for the workers"
    assert sum(p.count * p.resources.gpus for p in pools) <= gpus, f"{name}: not enough GPUs for the workers"


@needs_kubectl
def test_gpu_overlay_gives_each_worker_its_gpus(tmp_path: Path) -> None:
    documents = render("gpu-llama3-8b")
    config = load(config_text(documents), tmp_path)
    [rc] = of_kind(documents, "RayCluster")
    [group] = rc["spec"]["workerGroupSpecs"]
    [c] = group["template"]["spec"]["containers"]
    per_pod = quantity(c["resources"]["limits"][GPU])
    wanted = {config.workers.prefill.resources.gpus, config.workers.decode.resources.gpus}
    assert wanted == {per_pod}, "one worker per GPU pod: the pod's GPUs are what each worker asks Ray for"
    assert group["replicas"] == config.workers.prefill.count + config.workers.decode.count
    assert any(e["name"] == "NCCL_SOCKET_IFNAME" for e in c["env"])
    volumes = {v["name"]: v for _, _, s in raycluster_pods(rc) for v in s["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in {(d["kind"], d["metadata"]["name"]) for d in documents}
    assert head_container(rc)["image"].startswith("registry.example.com/pdserve:")


@needs_kubectl
def test_cpu_overlay_asks_for_no_gpu() -> None:
    text = yaml.safe_dump_all(render("cpu-smollm2"))
    assert GPU not in text


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_mount_is_a_defined_volume_and_mounts_do_not_nest(name: str) -> None:
    for where, spec in pod_specs(render(name)):
        defined = {v["name"] for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            paths = []
            for m in c.get("volumeMounts", []):
                assert m["name"] in defined, f"{where}/{c['name']}: volume {m['name']} is not defined"
                paths.append(m["mountPath"].rstrip("/"))
            for a in paths:  # a mount inside a read-only ConfigMap/Secret mount fails at container start
                inside = [b for b in paths if b.startswith(a + "/")]
                assert not inside, f"{where}/{c['name']}: {inside} mounted inside {a}"


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_referenced_configmap_and_secret_exists_or_is_user_created(name: str) -> None:
    extra = docs(OVERLAYS["gpu-llama3-8b"] / "model-download-job.yaml") if name == "gpu-llama3-8b" else []
    documents = list(render(name)) + extra
    present = {(d["kind"], d["metadata"]["name"]) for d in documents} | USER_CREATED
    for where, spec in pod_specs(documents):
        refs = []
        for v in spec.get("volumes", []):
            if "configMap" in v:
                refs.append(("ConfigMap", v["configMap"]["name"]))
            if "secret" in v:
                refs.append(("Secret", v["secret"]["secretName"]))
            if "persistentVolumeClaim" in v:
                refs.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]))
        for c in spec["containers"]:
            for e in c.get("env", []):
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if key in e.get("valueFrom", {}):
                        refs.append((kind, e["valueFrom"][key]["name"]))
        for ref in refs:
            assert ref in present, f"{where} uses {ref}, which is neither rendered nor made by hand (USER_CREATED)"


# ---- the image ---------------------------------------------------------------------------------------------------


def dockerfile() -> str:
    return (DEPLOY / "docker" / "Dockerfile").read_text()


def test_dockerfile_builds_on_cuda_and_installs_the_package() -> None:
    text = dockerfile()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    lines = [line.strip() for line in text.splitlines()]
    torch = next(i for i, line in enumerate(lines) if re.search(r"pip install \S*torch==", line))
    package = next(i for i, line in enumerate(lines) if "pip install /tmp/pdserve-src" in line)
    assert torch < package, "torch goes in first, so pip keeps that build"
    assert "python3.11" in text and "COPY . " in text
    assert "redis-server" not in re.sub(r"#.*", "", text), "Redis runs as its own pod, not in this image"
    # the head entrypoint the RayCluster calls is installed under the name it calls it by
    assert "/usr/local/bin/pdserve-ray-head" in text


def test_dockerfile_ray_version_matches_the_raycluster() -> None:
    [version] = re.findall(r"^ARG RAY_VERSION=(\S+)", dockerfile(), re.M)
    [rc] = of_kind(docs(BASE / "raycluster.yaml"), "RayCluster")
    assert rc["spec"]["rayVersion"] == version


def test_dockerignore_keeps_what_the_build_needs() -> None:
    ignored = {line.strip() for line in (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in ("pyproject.toml", "README.md", "deploy/docker", "deploy", "proto", "engine"):
        assert needed not in ignored
    assert ".git" in ignored


def test_head_entrypoint_is_valid_bash() -> None:
    script = DEPLOY / "docker" / "pdserve-ray-head.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)
    text = script.read_text()
    assert "KUBERAY_GEN_RAY_START_CMD" in text and 'pdserve up --config "$config"' in text


# ---- the dashboard -----------------------------------------------------------------------------------------------

METRIC_SOURCES = (ROOT / "router" / "metrics.py", ROOT / "router" / "fleet_metrics.py", ROOT / "worker" / "metrics.py")
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "rate", "irate", "increase", "delta", "histogram_quantile",
    "vector", "scalar", "clamp_min", "clamp_max", "abs", "absent", "label_replace", "sort", "sort_desc",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
}


def _kind(annotation: ast.expr | None, name: str) -> str | None:
    """counter / gauge / histogram from a metric class or a helper's return annotation."""
    text = (ast.unparse(annotation) if annotation is not None else name).lower()
    return next((k for k in ("histogram", "counter", "gauge") if k in text), None)


@cache
def source_metric_names() -> frozenset[str]:
    """Every series name the two metric modules can produce, from their source: the first argument of each
    Counter/Gauge/Histogram(...), *MetricFamily(...) or helper returning one, with prometheus_client's suffixes.
    An f-string name in a `for` over a module-level literal table is expanded over that table."""
    names = set()
    for path in METRIC_SOURCES:
        tree = ast.parse(path.read_text())
        helpers = {f.name: _kind(f.returns, "") for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
        tables = {t.id: _literal(n.value) for n in tree.body if isinstance(n, ast.Assign)
                  for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Tuple)}
        loops = {id(call): loop for loop in ast.walk(tree) if isinstance(loop, ast.For)
                 for call in ast.walk(loop) if isinstance(call, ast.Call)}
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and call.args):
                continue
            func = call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")
            kind = helpers.get(func) if func in helpers else _kind(None, func) if func[:1].isupper() else None
            if kind is None:
                continue
            for base in _names(call.args[0], loops.get(id(call)), tables):
                names.update(base + s for s in SUFFIXES[kind])
    return frozenset(n for n in names if n.startswith("pdserve_"))


def _literal(node: ast.expr) -> tuple:
    try:
        return ast.literal_eval(node)
    except ValueError:  # a tuple of names, not a table
        return ()


def _names(arg: ast.expr, loop: ast.For | None, tables: dict) -> list[str]:
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.JoinedStr) and loop is not None and isinstance(loop.iter, ast.Name):
        targets = [t.id for t in loop.target.elts] if isinstance(loop.target, ast.Tuple) else [loop.target.id]
        out = []
        for row in tables.get(loop.iter.id, ()):
            env = dict(zip(targets, row if isinstance(row, tuple) else (row,)))
            out.append("".join(str(v.value) if isinstance(v, ast.Constant) else str(env[v.value.id])
                               for v in arg.values))
        return out
    return []


def test_metric_names_parsed_from_source_match_what_the_registries_expose() -> None:
    """The parser above against the real thing: both metric objects' registries, collected."""
    from pdserve.router.metrics import RouterMetrics
    from pdserve.worker.metrics import WorkerMetrics

    exposed = set()
    for registry in (RouterMetrics().registry, WorkerMetrics("w0", "prefill", lambda: None).registry):
        for family in registry.collect():
            exposed.update(family.name + s for s in SUFFIXES[family.type])
    assert source_metric_names() == exposed


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "pdserve-dashboard.json").read_text())


def panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out += p.get("panels", [])  # a collapsed row holds its panels
    return out


def metric_tokens(expr: str) -> set[str]:
    """The identifiers of a PromQL expression that are not functions, keywords, label names or variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)          # string literals
    text = re.sub(r"\{[^}]*\}", "", text)                    # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                   # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)                  # Grafana variables
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"e\d*|inf|nan", w, re.I)}


def test_dashboard_is_a_current_grafana_dashboard_with_a_datasource_variable() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for p in panels(d):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in p["targets"]), p["title"]
    assert len({p["id"] for p in panels(d)}) == len(panels(d)), "panel ids must be unique"


def test_dashboard_queries_only_metrics_the_code_defines() -> None:
    known = source_metric_names()
    assert "pdserve_time_to_first_token_seconds_bucket" in known and "pdserve_worker_kv_blocks_used" in known
    for p in panels(dashboard()):
        if p["type"] == "row":
            continue
        used = set()
        for t in p["targets"]:
            tokens = metric_tokens(t["expr"])
            unknown = tokens - known
            assert not unknown, f"panel {p['title']!r}: {sorted(unknown)} not in router/metrics.py or " \
                                f"worker/metrics.py (expr: {t['expr']})"
            used |= tokens
        assert used, f"panel {p['title']!r} queries no pdserve metric"


def test_metric_token_check_can_fail() -> None:
    assert metric_tokens('sum by (le) (rate(pdserve_ttft_seconds_bucket{le="$x"}[5m]))') == {
        "pdserve_ttft_seconds_bucket"}
    assert "pdserve_ttft_seconds_bucket" not in source_metric_names()


def test_dashboard_has_the_promised_panels() -> None:
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels(dashboard()) if p["type"] != "row"}
    everything = " ".join(exprs.values())
    for quantile in ("0.5", "0.9", "0.99"):
        for metric in ("pdserve_time_to_first_token_seconds_bucket", "pdserve_time_per_output_token_seconds_bucket"):
            assert f"histogram_quantile({quantile}, sum by (le) (rate({metric}" in everything
    assert "vector($slo_ttft)" in everything and "vector($slo_tpot)" in everything, "SLO lines on the latency panels"
    for needed in ("sum by (outcome) (rate(pdserve_requests_total", "pdserve_requests_in_flight",
                   "pdserve_requests_waiting_for_room", "pdserve_request_migrations_total",
                   "pdserve_worker_kv_blocks_used", "max by (role, state) (pdserve_workers)",
                   "pdserve_worker_seconds_total"):
        assert needed in everything, needed


def test_slo_variables_are_histogram_bucket_bounds() -> None:
    """`le="$slo_ttft"` only matches a series when the value is written exactly as prometheus_client writes `le`."""
    bounds = {floatToGoString(b) for b in LATENCY_BUCKETS}
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    for name in ("slo_ttft", "slo_tpot"):
        values = [o["value"] for o in variables[name]["options"]]
        assert values and set(values) <= bounds, f"{name}: {sorted(set(values) - bounds)} are not bucket bounds"
        assert variables[name]["current"]["value"] in values
    for path in [DEPLOY / "configs" / "local.yaml", *(p / "cluster.yaml" for p in KUSTOMIZATIONS.values())]:
        slo = load_config(str(path)).slo
        assert floatToGoString(slo.ttft_s) in bounds and floatToGoString(slo.tpot_s) in bounds, \
            f"{path}: pick SLOs the dashboard can draw attainment for (a bucket bound)"


def test_dashboard_json_is_the_generators_output() -> None:
    """deploy/grafana/build_dashboard.py is the dashboard's source: edit it and rerun it, not the JSON."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_dashboard", DEPLOY / "grafana" / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == (DEPLOY / "grafana" / "pdserve-dashboard.json").read_text()
