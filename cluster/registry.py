"""The cluster's shared state in Redis: who the workers are, how loaded they are, and every finished request's
timings.

- `pdserve:<cluster>:worker:<id>`: a worker's `WorkerInfo` as JSON, written by its heartbeat every second with a TTL
  of a few seconds, so a worker that dies drops out of the registry on its own.
- `pdserve:<cluster>:router`: the router's address, with a TTL too.
- `pdserve:<cluster>:timings`: a stream; the router appends one entry per finished request (the controller reads
  the last window of it).
- `pdserve:<cluster>:decisions`: a stream of the ratio controller's decisions (JSON), and
  `pdserve:<cluster>:controller:pin`: an operator's pinned split, [prefill, decode].

Only JSON goes in and out: nothing read from Redis is unpickled.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass

import redis

HEARTBEAT_S = 1.0
TTL_S = 5
TIMINGS_MAXLEN = 100_000
DECISIONS_MAXLEN = 10_000


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
    """host:port of the TCPStore that KV pairs with this (decode) worker meet in."""
    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    metrics_port: int = 0
    """Port of the worker's Prometheus /metrics, on 127.0.0.1 of its machine; 0 while it serves none. Entries written
    before this field existed read as 0."""
    paired: tuple[str, ...] = ()
    """The workers it has a working KV pair with. A transfer that fails on the wire breaks its pair (gloo closes it),
    which then leaves this list, and the routers form it again."""

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        values["role"], values["state"] = self.role.value, self.state.value
        return json.dumps(values)

    @staticmethod
    def from_json(text: str | bytes) -> "WorkerInfo":
        values = json.loads(text)
        values["role"], values["state"] = Role(values["role"]), WorkerState(values["state"])
        values["paired"] = tuple(values.get("paired", ()))
        return WorkerInfo(**values)


class Registry:
    def __init__(self, redis_url: str, cluster: str = "default") -> None:
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.prefix = f"pdserve:{cluster}"

    def heartbeat(self, info: WorkerInfo) -> None:
        self.redis.set(self._worker_key(info.worker_id), info.to_json(), ex=TTL_S)

    def remove(self, worker_id: str) -> None:
        self.redis.delete(self._worker_key(worker_id))

    def workers(self) -> list[WorkerInfo]:
        keys = sorted(self.redis.scan_iter(match=self._worker_key("*"), count=1000))
        values = self.redis.mget(keys) if keys else []
        return [WorkerInfo.from_json(v) for v in values if v is not None]

    def set_router(self, address: str) -> None:
        self.redis.set(f"{self.prefix}:router", address, ex=TTL_S)

    def router(self) -> str | None:
        value = self.redis.get(f"{self.prefix}:router")
        return None if value is None else value.decode()

    def append_timings(self, fields: dict[str, str | int | float]) -> None:
        self.redis.xadd(self.timings_key, {k: str(v) for k, v in fields.items()}, maxlen=TIMINGS_MAXLEN,
                        approximate=True)

    def read_timings(self, count: int = 1000) -> list[dict[str, str]]:
        """The newest `count` entries, oldest first."""
        entries = self.redis.xrevrange(self.timings_key, count=count)
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in reversed(entries)]

    def timings_since(self, seconds: float) -> list[dict[str, str]]:
        """Entries of the last `seconds` (stream ids are the Redis server's milliseconds): the rolling window the
        controller reads."""
        now_s, now_us = self.redis.time()
        start_ms = int(now_s * 1000 + now_us // 1000 - seconds * 1000)
        entries = self.redis.xrange(self.timings_key, min=f"{start_ms}-0")
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]

    def append_decision(self, decision_json: str, dry_run: bool) -> None:
        self.redis.xadd(f"{self.prefix}:decisions", {"decision": decision_json, "dry_run": int(dry_run)},
                        maxlen=DECISIONS_MAXLEN, approximate=True)

    def read_decisions(self, count: int = 10) -> list[tuple[str, bool]]:
        """The newest `count` controller decisions (JSON, dry run?), oldest first."""
        entries = self.redis.xrevrange(f"{self.prefix}:decisions", count=count)
        return [(f[b"decision"].decode(), f[b"dry_run"] == b"1") for _, f in reversed(entries)]

    def set_pin(self, prefill: int, decode: int) -> None:
        self.redis.set(f"{self.prefix}:controller:pin", json.dumps([prefill, decode]))

    def clear_pin(self) -> None:
        self.redis.delete(f"{self.prefix}:controller:pin")

    def pin(self) -> tuple[int, int] | None:
        """The operator's pinned split (prefill, decode), if any."""
        value = self.redis.get(f"{self.prefix}:controller:pin")
        if value is None:
            return None
        prefill, decode = json.loads(value)
        return int(prefill), int(decode)

    @property
    def timings_key(self) -> str:
        return f"{self.prefix}:timings"

    def _worker_key(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"
