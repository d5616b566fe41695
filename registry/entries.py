"""What a worker and a router say about themselves in the registry (JSON, refreshed every second)."""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"
    """Colocated: prefill and decode in one worker."""


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: Role
    actor_name: str
    """The Ray actor's name in the cluster's namespace."""
    pid: int
    state: WorkerState
    store_address: str = ""
    """Where KV pairs with this (decode) worker meet: "file:<folder>" on one machine, or a TCPStore's host:port."""
    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    metrics_port: int = 0
    """Port of the worker's Prometheus /metrics, on 127.0.0.1 of its machine; 0 while it serves none."""
    prefix_cache_hit_rate: float = 0.0
    """Share of the prompt tokens of requests started here that came from its prefix cache, since it started."""
    speculative_acceptance_rate: float = 0.0
    """Speculative decoding since it started: the share of proposed tokens accepted (0: it does not speculate),"""
    speculative_tokens_per_step: float = 0.0
    """and the tokens a speculative step emitted on average (accepted proposals plus the model's own)."""
    engine_stalled_s: float = 0.0
    """How long its engine thread has been inside one step (or command between steps); seconds mean a hung engine."""
    paired: tuple[str, ...] = ()
    """The workers it has a working KV pair with. A transfer that fails on the wire breaks its pair (gloo closes it),
    which then leaves this list, and the prefill worker forms it again (`worker.kv_pairs`)."""

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        values["role"], values["state"] = self.role.value, self.state.value
        return json.dumps(values)

    @staticmethod
    def from_json(text: str | bytes) -> WorkerInfo:
        values = json.loads(text)
        values["role"], values["state"] = Role(values["role"]), WorkerState(values["state"])
        values["paired"] = tuple(values.get("paired", ()))
        return WorkerInfo(**values)


@dataclass(frozen=True)
class RouterInfo:
    """A router process: where it listens, how busy it is, and the arrival counters the ratio controller sums over
    every router."""

    router_id: str
    """Unique per process: a restarted router comes back under a new id."""
    address: str
    """Its gRPC host:port."""
    pid: int
    http_address: str = ""
    metrics_address: str = ""
    started_at: float = 0.0
    """Wall-clock seconds (time.time) when it started serving."""
    requests_in_flight: int = 0
    requests_waiting: int = 0
    """Accepted and not yet given a worker."""
    accepted_total: int = 0
    """Requests accepted since it started (the controller's arrival rate)."""
    accepted_prompt_tokens: int = 0
    accepted_by_class: tuple[int, ...] = ()
    """Accepted requests per prompt-length class (the controller's predicted output lengths)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> RouterInfo:
        values = json.loads(text)
        values["accepted_by_class"] = tuple(values.get("accepted_by_class", ()))
        return RouterInfo(**values)


@dataclass(frozen=True)
class ClusterSettings:
    """What a router needs to join the cluster, published by the control plane: any router (restarted, or started
    later with `pdserve router`) starts from these and the registry's address alone."""

    config: str
    """The cluster's configuration as JSON (`config.config_to_json`)."""
    ray_address: str
    """The Ray cluster's GCS address (host:port) the workers are actors of."""
    namespace: str
    """The Ray namespace of the worker actors."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> ClusterSettings:
        return ClusterSettings(**json.loads(text))
