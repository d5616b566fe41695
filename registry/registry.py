"""The cluster's shared state in Redis, under `pdserve:<cluster>:`.

- `worker:<id>`: a worker's `WorkerInfo` as JSON, written by its heartbeat every second with a TTL of a few
  seconds, so a worker that dies drops out of the registry on its own. `worker_numbers:<pool>` counts the ids given.
- `router:<id>`: a router's `RouterInfo`, likewise (`pdserve status` lists them; the controller sums their arrival
  counters).
- `control`: the control plane's address (its Scale and Drain service), with a TTL: absent while it is down.
- `settings`: the `ClusterSettings` routers start from (no TTL; the control plane writes them at every start).
- `stop`: set while the cluster is being stopped: every router exits on seeing it.
- `timings`: a stream; a router appends one entry per finished request (the controller reads the last window).
- `decisions`: a stream of the ratio controller's decisions (JSON), and `controller:pin`: an operator's pinned
  split, [prefill, decode].

Only JSON goes in and out: nothing read from Redis is unpickled. Every call is blocking: callers on an event loop
run them in a thread.
"""

from __future__ import annotations

import json

import redis

from pdserve.registry.entries import ClusterSettings, RouterInfo, WorkerInfo

CLUSTER = "default"
"""The cluster name every process uses (one cluster per Redis database)."""
HEARTBEAT_S = 1.0
TTL_S = 5
TIMINGS_MAXLEN = 100_000
DECISIONS_MAXLEN = 10_000
STOP_TTL_S = 120
"""The stop flag outlives a stop by this long at most (a cluster started again clears it at once)."""


class Registry:
    def __init__(self, redis_url: str, cluster: str = CLUSTER) -> None:
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.cluster = cluster
        self.prefix = f"pdserve:{cluster}"

    # ---- workers ---------------------------------------------------------------------------------------------
    def heartbeat(self, info: WorkerInfo) -> None:
        self.redis.set(self._key("worker", info.worker_id), info.to_json(), ex=TTL_S)

    def remove(self, worker_id: str) -> None:
        self.redis.delete(self._key("worker", worker_id))

    def workers(self) -> list[WorkerInfo]:
        return [WorkerInfo.from_json(v) for v in self._entries("worker")]

    def next_worker_number(self, pool: str) -> int:
        """0, 1, 2, ... for the pool's worker ids, never the same twice while Redis keeps its data (a control plane
        started again goes on counting)."""
        return int(self.redis.incr(f"{self.prefix}:worker_numbers:{pool}")) - 1

    # ---- routers ---------------------------------------------------------------------------------------------
    def announce_router(self, info: RouterInfo) -> None:
        self.redis.set(self._key("router", info.router_id), info.to_json(), ex=TTL_S)

    def remove_router(self, router_id: str) -> None:
        self.redis.delete(self._key("router", router_id))

    def routers(self) -> list[RouterInfo]:
        return [RouterInfo.from_json(v) for v in self._entries("router")]

    # ---- the control plane -----------------------------------------------------------------------------------
    def announce_control(self, address: str) -> None:
        self.redis.set(f"{self.prefix}:control", address, ex=TTL_S)

    def withdraw_control(self) -> None:
        self.redis.delete(f"{self.prefix}:control")

    def control(self) -> str | None:
        """The control plane's address, None while it is down."""
        value = self.redis.get(f"{self.prefix}:control")
        return None if value is None else value.decode()

    def publish_settings(self, settings: ClusterSettings) -> None:
        self.redis.set(f"{self.prefix}:settings", settings.to_json())

    def settings(self) -> ClusterSettings | None:
        value = self.redis.get(f"{self.prefix}:settings")
        return None if value is None else ClusterSettings.from_json(value)

    def publish_step_profile(self, profile: str) -> None:
        """The controller's profile of the workers' engine (JSON), for a control plane that adopts them later."""
        self.redis.set(f"{self.prefix}:step_profile", profile)

    def step_profile(self) -> str | None:
        return self.redis.get(f"{self.prefix}:step_profile")

    def request_stop(self) -> None:
        self.redis.set(f"{self.prefix}:stop", "1", ex=STOP_TTL_S)

    def clear_stop(self) -> None:
        self.redis.delete(f"{self.prefix}:stop")

    def stop_requested(self) -> bool:
        return bool(self.redis.exists(f"{self.prefix}:stop"))

    # ---- finished requests -----------------------------------------------------------------------------------
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

    # ---- the ratio controller --------------------------------------------------------------------------------
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

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    def _entries(self, kind: str) -> list[bytes]:
        keys = sorted(self.redis.scan_iter(match=self._key(kind, "*"), count=1000))
        return [v for v in (self.redis.mget(keys) if keys else []) if v is not None]
