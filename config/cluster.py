"""The cluster's configuration: `ClusterConfig`, the root of the YAML file, and its smaller sections (the workers
and their pools, the KV handoff, the SLO, injected faults). The router's and the controller's sections have their
own modules; `reader` turns a YAML file into these."""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import math
from dataclasses import dataclass, field

from pdserve.config.bounds import at_least
from pdserve.config.controller import Controller
from pdserve.config.router import Router
from pdserve.engine.config import ConfigError, EngineConfig


class Mode(enum.Enum):
    DISAGGREGATED = "disaggregated"
    """Prefill workers hand KV to decode workers."""
    COLOCATED = "colocated"
    """Every worker does both phases (the baseline disaggregation is measured against)."""


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    """Ray CPUs per worker; the worker pins this many torch threads."""
    gpus: float = 0.0
    """Ray GPUs per worker (1 on a GPU cluster)."""

    def __post_init__(self) -> None:
        at_least("cpus", self.cpus, 0)
        at_least("gpus", self.gpus, 0)


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
                at_least(name, getattr(self, name), 1)
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
        at_least("count", self.count, 0)

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
        at_least("hung_after_s", self.hung_after_s, 1)


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
        at_least("timeout_s", self.timeout_s, 0.001)


@dataclass(frozen=True)
class Faults:
    """Faults injected on purpose, for tests and drills; all off by default. Never set on a serving cluster."""

    kv_send_pause_s: float = 0.0
    """Every KV send pauses this long after its header, mid-transfer (a stalled transfer)."""
    kv_send_pause_count: int = 0
    """With kv_send_pause_s: only the first this many sends of each worker pause (0: every send)."""

    def __post_init__(self) -> None:
        at_least("kv_send_pause_s", self.kv_send_pause_s, 0)
        at_least("kv_send_pause_count", self.kv_send_pause_count, 0)


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0
    """Time to first token at the client (queueing, prefill and KV handoff)."""
    tpot_s: float = 0.2
    """Time per output token after the first."""

    def __post_init__(self) -> None:
        at_least("ttft_s", self.ttft_s, 0.001)
        at_least("tpot_s", self.tpot_s, 0.001)


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
