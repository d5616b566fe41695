"""`pdserve up --ray-address` against a Ray head started with `ray start` on this machine (the multi-node path,
on one node): the workers are actors of that Ray, the cluster serves over gRPC and HTTP, and `pdserve down` leaves
the Ray cluster running (it is not ours to stop)."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from pdserve.bench.local_cluster import start_cluster, stop_cluster
from pdserve.control_plane.local_redis import free_port

pytestmark = pytest.mark.model

HEAD_START_TIMEOUT_S = 90
HEAD_STOP_TIMEOUT_S = 5
CONFIG = {"engine": {"num_kv_blocks": 256, "max_num_batched_tokens": 256},
          "workers": {"prefill": {"count": 1, "resources": {"cpus": 1}},
                      "decode": {"count": 1, "resources": {"cpus": 1}}}}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head of our own on 127.0.0.1 (`ray start --block`, so ending that process stops only this one).
    Ray's token auth is off for it and its clients: whether it is on depends on a token file in the home folder,
    and this test is about our Ray path, not Ray's auth."""
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # inherited by `ray start`, `pdserve up` and the checks below
    port = free_port()
    temp_dir = str(tmp_path_factory.mktemp("ray"))
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "4", "--include-dashboard", "false", "--temp-dir", temp_dir,
         "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "health-check", "--address", address],
                         capture_output=True).returncode != 0:
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            pytest.fail(f"ray start did not come up: {head.stderr.read().decode()[-2000:]}")
        time.sleep(1)
    yield address, head
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=HEAD_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # Ray's own shutdown can take half a minute; its processes share our group
        pass
    os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE")
    else:
        os.environ["RAY_AUTH_MODE"] = saved


def test_up_joins_a_ray_head_serves_and_leaves_it_running(ray_head, tmp_path):
    address, head = ray_head
    cluster = start_cluster(str(tmp_path), CONFIG, up_args=("--ray-address", address))
    try:
        status = cluster.pdserve("status", "--json")
        assert status.returncode == 0, status.stderr
        workers = json.loads(status.stdout)["workers"]
        assert sorted(w["role"] for w in workers) == ["decode", "prefill"]
        actors = subprocess.run([sys.executable, "-c", (
            f"import ray, json; ray.init(address={address!r}, logging_level='ERROR');"
            "print(json.dumps(ray.util.list_named_actors(all_namespaces=True)))")],
            capture_output=True, text=True, timeout=120)
        assert actors.returncode == 0, actors.stderr[-2000:]
        named = {(a["namespace"], a["name"]) for a in json.loads(actors.stdout.splitlines()[-1])}
        assert {("pdserve", f"default-{w['worker_id']}") for w in workers} <= named
        body = json.dumps({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(f"{cluster.http_url}/completions", body,
                                         {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert reply["choices"][0]["text"] and reply["usage"]["completion_tokens"] == 8
    finally:
        stop_cluster(cluster)
    assert head.poll() is None, "pdserve down stopped a Ray cluster it did not start"
