"""How many workers of each role run, and on which cores: the first specs `pdserve up` starts, and the operator's
changes after (`pdserve scale`, `pdserve drain`: a router's Admin Scale and Drain, passed on to the control plane's
Control service).

    scaler = Scaler(pool, config, redis_url, cores)
    await pool.start(scaler.initial_specs())
    started, stopped = await scaler.scale({Role.DECODE: 3})      # starts or drains-then-stops workers
    stopped, started = await scaler.drain("decode-0", replace=True)
    [spec] = scaler.plan_adds([Role.DECODE]); await scaler.start_added(spec, 600)      # the controller's ADD
    await scaler.remove("decode-3")                                                      # the controller's REMOVE

A worker that is stopped is drained first: it takes no new requests, finishes those it runs, then stops, so no
request is lost. One change runs at a time. A change that would leave a disaggregated cluster without a prefill or
a decode worker (or a colocated one without any worker) is refused with `ScaleError`, naming the field; a worker id
that is not in the pool with `UnknownWorker`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable

import ray

from pdserve.config import ClusterConfig, Mode
from pdserve.control_plane.worker_pool import ROLE_NAMES, WorkerPool
from pdserve.registry.entries import Role
from pdserve.worker.runtime import WorkerSpec

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MAX_WORKERS_PER_ROLE = 256


class ScaleError(ValueError):
    """The change asked for cannot be made; the message names the field."""


class UnknownWorker(ScaleError):
    """No worker has the id given."""


class Scaler:
    def __init__(self, pool: WorkerPool, config: ClusterConfig, redis_url: str, cores: list[int],
                 running: Callable[[str], int] | None = None,
                 free_resources: Callable[[], dict[str, float]] = ray.available_resources) -> None:
        """`cores`: this machine's cores to pin workers on (empty on a Ray cluster: Ray places them).
        `running`: a worker's running requests now; scaling down stops the least busy first.
        `free_resources`: Ray's unclaimed resources ({"CPU": .., "GPU": ..})."""
        self.pool = pool
        self.config = config
        self.redis_url = redis_url
        self.cores = cores
        self.running = running or (lambda worker_id: 0)
        self.free_resources = free_resources
        self._lock = asyncio.Lock()

    @property
    def roles(self) -> tuple[Role, ...]:
        return (Role.BOTH,) if self.config.mode is Mode.COLOCATED else (Role.PREFILL, Role.DECODE)

    def initial_specs(self) -> list[WorkerSpec]:
        """One spec per configured worker, each pinned to its own cores while there are enough (then shared)."""
        return self._new_specs([role for role in self.roles for _ in range(self.pool.pool(role).count)])

    def _new_specs(self, roles: list[Role]) -> list[WorkerSpec]:
        """A new worker per role in `roles`, each on the cores the running and the earlier new ones use least."""
        specs: list[WorkerSpec] = []
        for role in roles:
            worker_id = self.pool.next_id(role)
            host = LOOPBACK if self.config.ray_address is None else ""  # "": the worker's node address, from Ray
            specs.append(WorkerSpec(worker_id, role, self.pool.engine(role), self.config.kv_transfer, self.redis_url,
                                    self.pool.cluster, self.pool.namespace, self.pool.actor_name(worker_id),
                                    cores=self._free_cores(role, specs), host=host,
                                    lease_s=self.config.router.lease_s, faults=self.config.faults))
        return specs

    def _free_cores(self, role: Role, planned: list[WorkerSpec]) -> tuple[int, ...]:
        if not self.cores:
            return ()
        n = max(1, math.ceil(self.pool.pool(role).resources.cpus))
        used = Counter(core for spec in [*self.pool.specs.values(), *planned] for core in spec.cores)
        order = sorted(self.cores, key=lambda core: (used[core], self.cores.index(core)))
        return tuple(sorted(order[:n]))

    async def scale(self, wanted: dict[Role, int]) -> tuple[list[str], list[str]]:
        """Start or stop workers until each role in `wanted` has that many; returns (started, stopped) ids."""
        for role, count in wanted.items():
            self._check(role, count)
        started: list[str] = []
        stopped: list[str] = []
        async with self._lock:
            for role, count in wanted.items():
                have = [w for w, spec in self.pool.specs.items() if spec.role is role and w not in self.pool.moving]
                if count > len(have):
                    self._check_room(role, count - len(have))
                    specs = self._new_specs([role] * (count - len(have)))
                    await self.pool.start(specs)
                    started += [s.worker_id for s in specs]
                elif count < len(have):
                    chosen = sorted(have, key=self.running)[:len(have) - count]
                    await asyncio.gather(*(self.pool.remove(w) for w in chosen))
                    stopped += chosen
        log.warning("scaled to %s: started %s, stopped %s", {r.value: c for r, c in wanted.items()}, started, stopped)
        return started, stopped

    def plan_adds(self, roles: list[Role]) -> list[WorkerSpec]:
        """The specs of new workers, one per role in `roles` (the ratio controller's ADD), on the least-used cores.
        On this machine's own Ray, refused with `ScaleError` when Ray has no room for them; on a Ray cluster, none
        is checked: an autoscaler may bring up nodes for them (`start_added` gives up after its timeout)."""
        counts = self.pool.counts()
        for role in set(roles):
            self._check(role, counts[role] + roles.count(role))
            if self.cores:
                self._check_room(role, roles.count(role))
        return self._new_specs(roles)

    async def start_added(self, spec: WorkerSpec, timeout_s: float) -> None:
        """Start a planned worker; one Ray has not placed and started within `timeout_s` is killed and forgotten,
        and `ScaleError` says why."""
        try:
            await self.pool.start([spec], timeout_s)
        except TimeoutError:
            self.pool.abandon(spec.worker_id)
            raise ScaleError(f"{spec.worker_id}: not placed and started within {timeout_s:g} s (add_timeout_s); "
                             f"Ray could not find {self.pool.pool(spec.role).resources} for it") from None
        except ray.exceptions.RayError as e:
            self.pool.abandon(spec.worker_id)
            raise ScaleError(f"{spec.worker_id}: its start failed: {e}") from e
        log.warning("added %s worker %s", ROLE_NAMES[spec.role], spec.worker_id)

    async def remove(self, worker_id: str) -> None:
        """Drain `worker_id` and stop it (the ratio controller's REMOVE); its requests finish (or are handed on)
        first, so none is lost."""
        if worker_id not in self.pool.specs:
            raise UnknownWorker(f"worker_id: no worker {worker_id!r}")
        if worker_id in self.pool.moving:
            raise ScaleError(f"worker_id: {worker_id} is being moved to the other role")
        self.pool.moving.add(worker_id)  # operator drains and scales leave it alone meanwhile
        try:
            await self.pool.remove(worker_id)
        finally:
            self.pool.moving.discard(worker_id)
        log.warning("removed worker %s", worker_id)

    async def drain(self, worker_id: str, replace: bool = False) -> tuple[str, str]:
        """Drain `worker_id` and stop it; with `replace`, start a fresh worker in its role. Returns (stopped, started
        or "")."""
        async with self._lock:
            spec = self.pool.specs.get(worker_id)
            if spec is None:
                known = ", ".join(sorted(self.pool.specs)) or "none"
                raise UnknownWorker(f"worker_id: no worker {worker_id!r} (workers: {known})")
            if worker_id in self.pool.moving:
                raise ScaleError(f"worker_id: {worker_id} is being moved or removed by the ratio controller; "
                                 "drain it once the move is done (`pdserve status`)")
            left = sum(1 for s in self.pool.specs.values() if s.role is spec.role) - 1
            if not replace and left < 1:
                raise ScaleError(f"worker_id: {worker_id} is the last {ROLE_NAMES[spec.role]} worker; drain it with "
                                 "replace, or scale up first")
            await self.pool.remove(worker_id)
            if not replace:
                return worker_id, ""
            new = dataclasses.replace(self._new_specs([spec.role])[0], cores=spec.cores)
            await self.pool.start([new])
            return worker_id, new.worker_id

    def _check_room(self, role: Role, count: int) -> None:
        """Refuse at once what Ray could not place (the actors would wait for resources for ever)."""
        resources = self.pool.pool(role).resources
        free = self.free_resources()
        cpus, gpus = resources.cpus * count, resources.gpus * count
        if cpus > free.get("CPU", 0.0) + 1e-9 or gpus > free.get("GPU", 0.0) + 1e-9:
            raise ScaleError(f"{ROLE_NAMES[role]}: {count} more worker(s) need {cpus:g} CPUs and {gpus:g} GPUs; the "
                             f"Ray cluster has {free.get('CPU', 0.0):g} CPUs and {free.get('GPU', 0.0):g} GPUs free")

    def _check(self, role: Role, count: int) -> None:
        name = ROLE_NAMES[role]
        if role not in self.roles:
            raise ScaleError(f"{name}: a {self.config.mode.value} cluster has no {name} workers")
        if not 1 <= count <= MAX_WORKERS_PER_ROLE:
            raise ScaleError(f"{name}: must be between 1 and {MAX_WORKERS_PER_ROLE} (the cluster needs at least one "
                             f"{name} worker to serve), got {count}")
