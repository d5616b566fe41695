"""The cluster's configuration: one YAML file validated into frozen dataclasses.

    cfg = load_config("deploy/configs/local.yaml")

Every problem raises `ConfigError` with the field's dotted path and what was wrong ("workers.prefill.count: must
be >= 0, got -1"). Unknown keys are errors too, so a typo never silently falls back to a default. The `engine:`
section is `engine.config.EngineConfig`, shared by every worker; each pool can change its scheduler and KV cache
(`workers.prefill.engine`, `workers.decode.engine`), so that each phase is tuned for itself.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from pdserve.engine.config import ConfigError, EngineConfig

ROUTINGS = ("load", "kv_aware")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deploy", "configs", "local.yaml")


class Mode(enum.Enum):
    DISAGGREGATED = "disaggregated"
    """Prefill workers hand KV to decode workers."""
    COLOCATED = "colocated"
    """Every worker does both phases (the baseline disaggregation is measured against)."""


def _at_least(name: str, value: float, low: float) -> None:
    if not (math.isfinite(value) and value >= low):
        raise ConfigError(f"{name}: must be >= {low}, got {value!r}")


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    """Ray CPUs per worker; the worker pins this many torch threads."""
    gpus: float = 0.0
    """Ray GPUs per worker (1 on a GPU cluster)."""

    def __post_init__(self) -> None:
        _at_least("cpus", self.cpus, 0)
        _at_least("gpus", self.gpus, 0)


@dataclass(frozen=True)
class EngineOverrides:
    """One pool's changes to the shared `engine:` section. Only what may differ between the two ends of a KV
    handoff is here: the model, dtype and block size must match (KV moves in whole blocks of one layout)."""

    max_num_batched_tokens: int | None = None
    """A prefill pool wants a large step budget (long chunks); a decode pool a small one."""
    max_num_seqs: int | None = None
    """A decode pool batches many requests; a prefill pool few."""
    num_kv_blocks: int | None = None
    kv_cache_gib: float | None = None
    """Set alone, it replaces the shared num_kv_blocks too (the cache is then sized in GiB)."""
    num_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "num_kv_blocks", "num_threads"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if self.kv_cache_gib is not None and not (math.isfinite(self.kv_cache_gib) and self.kv_cache_gib > 0):
            raise ConfigError(f"kv_cache_gib: must be a positive number, got {self.kv_cache_gib!r}")

    def apply(self, engine: EngineConfig) -> EngineConfig:
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        if "kv_cache_gib" in changes and "num_kv_blocks" not in changes:
            changes["num_kv_blocks"] = None
        return dataclasses.replace(engine, **changes)


@dataclass(frozen=True)
class Pool:
    count: int = 1
    """How many workers of this role to start."""
    resources: Resources = field(default_factory=Resources)
    engine: EngineOverrides = field(default_factory=EngineOverrides)
    """This pool's changes to the shared `engine:` section (unset fields keep it)."""

    def __post_init__(self) -> None:
        _at_least("count", self.count, 0)

    def engine_config(self, shared: EngineConfig) -> EngineConfig:
        """The engine this pool's workers run."""
        return self.engine.apply(shared)


@dataclass(frozen=True)
class Workers:
    prefill: Pool = field(default_factory=Pool)
    decode: Pool = field(default_factory=Pool)
    colocated: Pool = field(default_factory=lambda: Pool(count=0, resources=Resources(cpus=2.0)))
    """Workers doing both phases, used in colocated mode; by default as many cores as 1 prefill + 1 decode."""
    hung_after_s: float = 15.0
    """A worker that does not answer for this long (its process stopped, its event loop blocked), or whose engine
    stays inside one step this long, is hung: the control plane kills it and starts another in its place, and its
    requests resume elsewhere. Keep it above the longest step (with `engine.compile`, the first steps compile)."""

    def __post_init__(self) -> None:
        _at_least("hung_after_s", self.hung_after_s, 1)


KV_BACKENDS = ("gloo", "nccl", "nixl", "ipc", "auto")


@dataclass(frozen=True)
class KVTransfer:
    backend: str = "auto"
    """gloo (CPU tensors), nccl (CUDA tensors), nixl (either: NIXL over UCX; `pip install 'pdserve[nixl]'`), ipc
    (either, workers on one node only: CUDA IPC on GPUs, shared memory on CPUs), or auto: each pair chooses, ipc when
    both workers are on one node, else gloo or nccl by where the cache lives."""
    timeout_s: float = 30.0
    """A handoff that takes longer fails; the blocks are freed on both sides."""
    layerwise: bool = False
    """Stream each layer's KV while the prefill's last step computes the rest, instead of after the step: the handoff
    then overlaps the step (gloo and nccl; see BENCHMARKS.md for what it buys)."""
    checksums: bool = False
    """Every handoff carries a CRC-32 per layer, and the receiver fails one whose bytes differ (the request is
    computed again). Costs a pass over the KV on each side (CRC-32 at ~2 GiB/s on the dev box's CPU); on in tests."""

    def __post_init__(self) -> None:
        if self.backend not in KV_BACKENDS:
            raise ConfigError(f"backend: {self.backend!r} is not one of {list(KV_BACKENDS)}")
        if self.backend == "nixl" and importlib.util.find_spec("nixl") is None:
            raise ConfigError("backend: nixl needs the nixl package (pip install 'pdserve[nixl]')")
        if self.backend in ("nixl", "ipc") and self.layerwise:
            raise ConfigError(f"layerwise: not supported with backend {self.backend} (a read needs the whole KV "
                              f"computed)")
        if self.backend in ("nixl", "ipc") and self.checksums:
            raise ConfigError(f"checksums: not supported with backend {self.backend} (its reads land in place, "
                              f"unchecked)")
        _at_least("timeout_s", self.timeout_s, 0.001)


@dataclass(frozen=True)
class Faults:
    """Faults injected on purpose, for tests and drills; all off by default. Never set on a serving cluster."""

    kv_send_pause_s: float = 0.0
    """Every KV send pauses this long after its header, mid-transfer (a stalled transfer)."""
    kv_send_pause_count: int = 0
    """With kv_send_pause_s: only the first this many sends of each worker pause (0: every send)."""

    def __post_init__(self) -> None:
        _at_least("kv_send_pause_s", self.kv_send_pause_s, 0)
        _at_least("kv_send_pause_count", self.kv_send_pause_count, 0)


@dataclass(frozen=True)
class Router:
    host: str = "127.0.0.1"
    """The public gRPC port's address; 0.0.0.0 to serve beyond this machine."""
    port: int = 50051
    http_port: int | None = 8000
    """OpenAI-compatible HTTP (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics) on `host`;
    null turns it off."""
    served_model_name: str | None = None
    """The model's name in the HTTP API (/v1/models, the requests' `model`); unset: `engine.model`."""
    metrics_port: int | None = None
    """Prometheus /metrics of the router, on 127.0.0.1; unset picks a free port (in the state file, `pdserve status`).
    Each worker serves its own on a free port, named in its registry entry (`metrics_port`)."""
    max_waiting: int = 1024
    """The admission queue: requests accepted and not yet given a worker (waiting for KV room). Beyond it a new
    request gets RESOURCE_EXHAUSTED at once. Requests waiting here have no deadline but the client's own."""
    lease_s: float = 30.0
    """How long a decode worker keeps the requests of a router that stopped collecting their tokens (killed, hung,
    cut off) before it aborts them and frees their KV blocks. Within it a client that reconnects (to the restarted
    router, or another one) takes its request over where it left off."""
    token_file: str | None = None
    """A file whose first line is the bearer token every call must carry (`authorization: Bearer <token>`);
    unset: no token is asked for (fine on 127.0.0.1, not beyond)."""
    tls_cert_file: str | None = None
    """PEM certificate chain for the public port; with tls_key_file, the router speaks TLS only."""
    tls_key_file: str | None = None
    worker_wait_s: float = 30.0
    """How long a request waits for a worker when none of the kind it needs is ready (one died and its replacement
    is starting: ~12 s under load here; a request resumed from the dead one waits too) before UNAVAILABLE. The
    client's own deadline still applies."""
    max_body_bytes: int = 10 * 2**20
    """HTTP request bodies larger than this are refused (413) before they are read whole. gRPC messages are bounded
    by gRPC's own 4 MiB default."""
    max_file_bytes: int = 200 * 2**20
    """Files uploaded to the Batch API (POST /v1/files) may be this large; other bodies keep max_body_bytes."""
    files_dir: str | None = None
    """Where the Batch API keeps its files (inputs, outputs); the routers of a cluster must share it. Unset: `files`
    beside the cluster's state file ($PDSERVE_STATE_DIR, or ~/.cache/pdserve/run)."""
    max_connections: int = 4096
    """Open HTTP connections at most (gRPC: the same bound of its own). A new one beyond it takes the place of the
    oldest connection that has sent no request, so a flood of idle connections cannot lock clients out."""
    max_connections_per_address: int = 1024
    """Open HTTP connections from one client address at most (a proxy in front counts as one address)."""
    header_timeout_s: float = 10.0
    """A connection that has not sent a whole request head (HTTP) or finished its handshake (gRPC) this long after
    it opened is closed."""
    routing: str = "kv_aware"
    """How a request's workers are chosen. "load": the decode worker with the most free KV blocks, then the paired
    prefill worker with the fewest queued prompt tokens. "kv_aware" (with engine.prefix_caching): the same, weighed
    against the leading blocks of the prompt each worker holds in its prefix cache, as the workers' cache events
    tell (router/policy.py has the cost). A prompt no worker holds any of is routed as with "load"."""
    low_priority_limit: int = 8
    """Low-priority requests (priority above 0: the Batch API's, or a client's `priority`) this router lets through
    to workers at once, and only while no online request waits here for a worker (router/priority_gate.py)."""
    cache_weight: float = 1.0
    """KV-aware routing's weight of cache misses against load. Prefill cost: queued prompt tokens + cache_weight x
    the prompt tokens that worker would compute. Decode cost: the share of its KV blocks in use + cache_weight x the
    share of the prompt's blocks it would receive. 0 routes by load alone; larger follows the cache further into
    load."""

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ConfigError(f"router.routing: {self.routing!r} is not one of {list(ROUTINGS)}")
        if not (self.cache_weight >= 0 and math.isfinite(self.cache_weight)):
            raise ConfigError(f"router.cache_weight: must be a finite number >= 0, got {self.cache_weight!r}")
        for name in ("port", "http_port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 65536:
                raise ConfigError(f"{name}: must be a port number (1-65535), got {value!r}")
        _at_least("max_waiting", self.max_waiting, 1)
        _at_least("low_priority_limit", self.low_priority_limit, 1)
        _at_least("max_body_bytes", self.max_body_bytes, 1024)
        _at_least("max_file_bytes", self.max_file_bytes, 1024)
        _at_least("worker_wait_s", self.worker_wait_s, 0)
        _at_least("max_connections", self.max_connections, 16)
        _at_least("max_connections_per_address", self.max_connections_per_address, 1)
        _at_least("header_timeout_s", self.header_timeout_s, 0.1)
        _at_least("lease_s", self.lease_s, 1)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file, tls_key_file: give both (TLS on) or neither (TLS off)")


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0
    """Time to first token at the client (queueing, prefill and KV handoff)."""
    tpot_s: float = 0.2
    """Time per output token after the first."""

    def __post_init__(self) -> None:
        _at_least("ttft_s", self.ttft_s, 0.001)
        _at_least("tpot_s", self.tpot_s, 0.001)


@dataclass(frozen=True)
class Controller:
    """The prefill:decode ratio controller (disaggregated mode; see controller/ for the math)."""

    enabled: bool = False
    """Tick the controller in the control plane; every decision goes to the log and Redis (`pdserve status` shows
    them)."""
    dry_run: bool = False
    """Decide and record, but move no worker."""
    interval_s: float = 5.0
    """Seconds between ticks."""
    cooldown_s: float = 30.0
    """No move within this long of the last one finishing."""
    window_s: float = 30.0
    """The traffic window: requests finished in the last this many seconds (from the Redis timings stream)."""
    max_moves: int = 1
    """Most workers one decision moves (they drain in parallel)."""
    confirm_ticks: int = 2
    """Ticks in a row a new target must be seen before a move (hysteresis)."""
    shift_ratio: float = 1.5
    """A change in the arriving prompts' length by this factor (and a split that fits it this much worse) is a shift
    in the mix: move at once, without confirmation or cooldown. .inf: never."""
    warmup_s: float = 60.0
    """After traffic begins, move only for a shift (or the first fit), and remove nothing, for this long (the first
    requests to finish are the short ones); adds go on."""
    min_gain: float = 0.05
    """Move only when the predicted bottleneck load falls by at least this much (a smaller gain is within the
    model's error, and a move costs a drain)."""
    target_load: float = 0.95
    """With max_workers: add workers when even the best split is loaded above this, as many as bring it there
    (judged at the arrival rate projected one worker start ahead)."""
    scale_down_load: float = 0.85
    """With min_workers: remove a worker when one fewer keeps both pools at or below this (below target_load)."""
    hand_on_after_s: float | None = None
    """A decode worker leaving its pool (moved, removed, drained) hands on the requests it still decodes this long
    after its drain began: each resumes on another decode worker, its prompt and tokens so far prefilled again,
    instead of holding the move up for minutes of long answers. None: wait for them to finish."""
    pin_prefill: int | None = None
    """With pin_decode: hold the split at this many prefill workers whatever the traffic (`pdserve ratio --pin`
    sets the same at run time)."""
    pin_decode: int | None = None
    min_workers: int | None = None
    """The controller may remove workers (drained first, the least loaded) down to this many. None: never."""
    max_workers: int | None = None
    """The controller may add workers (started through Ray in the pool that needs one) up to this many. None:
    never. On a Ray cluster with an autoscaler (KubeRay included) Ray brings up the node a new worker needs."""
    min_prefill: int = 1
    max_prefill: int | None = None
    """Per-pool bounds the controller keeps in moves, adds and removes (None: only the total bounds)."""
    min_decode: int = 1
    max_decode: int | None = None
    scale_down_cooldown_s: float = 120.0
    """No remove within this long of the last change: scaling down waits longer than scaling up (cooldown_s)."""
    add_timeout_s: float = 600.0
    """An added worker that Ray has not placed and started within this long is given up (killed) and the failure
    recorded; on a local Ray, an add the machine has no room for is refused at once."""
    policy: str = ""
    """The policy that ticks: "" (the built-in ratio controller) or "package.module:Class" (`controller.policy`)."""
    policy_config: dict[str, Any] = field(default_factory=dict)
    """The policy's own settings (the built-in one takes none: its settings are this section's)."""

    def __post_init__(self) -> None:
        _at_least("interval_s", self.interval_s, 0.01)
        _at_least("scale_down_cooldown_s", self.scale_down_cooldown_s, 0)
        _at_least("add_timeout_s", self.add_timeout_s, 1)
        self._check_budget()
        self._check_policy()
        _at_least("cooldown_s", self.cooldown_s, 0)
        _at_least("window_s", self.window_s, 0.1)
        _at_least("max_moves", self.max_moves, 1)
        _at_least("confirm_ticks", self.confirm_ticks, 1)
        _at_least("warmup_s", self.warmup_s, 0)
        _at_least("min_gain", self.min_gain, 0)
        _at_least("target_load", self.target_load, 0.01)
        _at_least("scale_down_load", self.scale_down_load, 0)
        if self.scale_down_load >= self.target_load:
            raise ConfigError(f"scale_down_load: must be below target_load ({self.target_load}), got "
                              f"{self.scale_down_load!r} (or the fleet adds and removes in turn)")
        if not (isinstance(self.shift_ratio, (int, float)) and self.shift_ratio >= 1):
            raise ConfigError(f"shift_ratio: must be >= 1 (.inf: never), got {self.shift_ratio!r}")
        if self.hand_on_after_s is not None:
            _at_least("hand_on_after_s", self.hand_on_after_s, 0)
        if (self.pin_prefill is None) != (self.pin_decode is None):
            raise ConfigError("pin_prefill: set pin_prefill and pin_decode together, or neither")
        for name in ("pin_prefill", "pin_decode"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)

    @property
    def pin(self) -> tuple[int, int] | None:
        return None if self.pin_prefill is None else (self.pin_prefill, self.pin_decode)

    def _check_budget(self) -> None:
        _at_least("min_prefill", self.min_prefill, 1)
        _at_least("min_decode", self.min_decode, 1)
        for name, low in (("max_prefill", self.min_prefill), ("max_decode", self.min_decode)):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), low)
        smallest = self.min_prefill + self.min_decode
        for name in ("min_workers", "max_workers"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), smallest)
        if self.min_workers is not None and self.max_workers is not None and self.min_workers > self.max_workers:
            raise ConfigError(f"min_workers: must not exceed max_workers ({self.max_workers}), got {self.min_workers}")

    def _check_policy(self) -> None:
        """The policy's module must be importable (found, not imported: importing runs its code)."""
        if self.policy in ("", "ratio"):
            if self.policy_config:
                raise ConfigError("policy_config: the built-in ratio policy takes its settings from this section")
            return
        module, _, name = self.policy.partition(":")
        if not module or not name:
            raise ConfigError(f"policy: expected 'package.module:Class' (or 'ratio'), got {self.policy!r}")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise ConfigError(f"policy: no module {module!r} is importable here")


@dataclass(frozen=True)
class ClusterConfig:
    mode: Mode = Mode.DISAGGREGATED
    engine: EngineConfig = field(default_factory=EngineConfig)
    workers: Workers = field(default_factory=Workers)
    kv_transfer: KVTransfer = field(default_factory=KVTransfer)
    router: Router = field(default_factory=Router)
    redis_url: str | None = None
    """redis://host:port/db; unset starts a local redis-server for the cluster."""
    ray_address: str | None = None
    """An existing Ray cluster ("auto" or host:port); unset starts a local Ray."""
    slo: SLO = field(default_factory=SLO)
    controller: Controller = field(default_factory=Controller)
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        pools = {"prefill": self.workers.prefill.count, "decode": self.workers.decode.count,
                 "colocated": self.workers.colocated.count}
        if self.mode is Mode.DISAGGREGATED and (pools["prefill"] < 1 or pools["decode"] < 1):
            raise ConfigError(f"workers: disaggregated mode needs at least 1 prefill and 1 decode worker, got {pools}")
        if self.mode is Mode.COLOCATED and pools["colocated"] < 1:
            raise ConfigError(f"workers.colocated.count: colocated mode needs at least 1, got {pools['colocated']}")
        if self.controller.enabled and self.mode is Mode.COLOCATED:
            raise ConfigError("controller.enabled: the ratio controller needs mode disaggregated")
        self._check_fleet(pools["prefill"] + pools["decode"])
        if self.kv_transfer.backend == "nccl" and self.engine.device == "cpu":
            raise ConfigError("kv_transfer.backend: nccl moves CUDA tensors; with engine.device cpu use gloo")
        for name in ("prefill", "decode", "colocated"):
            getattr(self.workers, name).engine_config(self.engine)  # an override the engine refuses names its pool

    def _check_fleet(self, workers: int) -> None:
        """The configured workers start within the controller's budget."""
        low, high = self.controller.min_workers, self.controller.max_workers
        if self.mode is Mode.DISAGGREGATED and high is not None and workers > high:
            raise ConfigError(f"controller.max_workers: {high} is below the {workers} workers configured "
                              "(workers.prefill.count + workers.decode.count)")
        if self.mode is Mode.DISAGGREGATED and low is not None and workers < low:
            raise ConfigError(f"controller.min_workers: {low} is above the {workers} workers configured")


def state_dir() -> str:
    """Where this machine keeps a cluster's local state (its state file, log and the Batch API's files):
    $PDSERVE_STATE_DIR, or ~/.cache/pdserve/run."""
    return os.environ.get("PDSERVE_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pdserve", "run")


def config_to_json(config: ClusterConfig) -> str:
    """The config as JSON that `config_from_json` (and `parse_config`) read back to an equal config."""
    return json.dumps(_plain(config))


def config_from_json(text: str) -> ClusterConfig:
    return parse_config(json.loads(text))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def load_config(path: str | None = None) -> ClusterConfig:
    """Read and validate a YAML file (the default: deploy/configs/local.yaml)."""
    path = path or DEFAULT_CONFIG
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"config file {path!r}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r}: not valid YAML: {e}") from e
    return parse_config(values)


def parse_config(values: Any) -> ClusterConfig:
    return _build(ClusterConfig, values, "")


def _build(cls: type, values: Any, path: str) -> Any:
    """A frozen dataclass from a mapping, recursively; errors name the dotted field path."""
    if cls is EngineConfig:
        return EngineConfig.from_dict(values if values is not None else {})
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path or 'config'}: must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{name}: unknown field (known: {', '.join(sorted(fields))})")
        kwargs[key] = _value(fields[key], value, name)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # the dataclass names its own field; add where it sits
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None


def _value(f: dataclasses.Field, value: Any, name: str) -> Any:
    annotation = str(f.type)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(default):
        return _build(type(default), value, name)
    if isinstance(default, enum.Enum):
        try:
            return type(default)(value)
        except ValueError:
            raise ConfigError(f"{name}: {value!r} is not one of {[m.value for m in type(default)]}") from None
    optional = annotation.endswith("| None")
    if value is None and optional:
        return None
    base = annotation.split("|")[0].strip()
    if base == "str" and isinstance(value, str):
        return value
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base.startswith("dict") and isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise ConfigError(f"{name}: expected {base}, got {type(value).__name__} {value!r}")
