"""The worker actors of a cluster: start them, stop them, move one to the other role, add or remove one, replace
one that died, and adopt those a previous control plane left running.

Workers are detached Ray actors named `<cluster>-<worker id>`: they outlive the control plane (and the routers), so
a control plane that is killed leaves the cluster serving, and the next one adopts every live worker (`adopt`).

A move (the ratio controller's actuator) never loses a request:

    drain(worker): its registry state turns DRAINING at once; routers stop picking it within one refresh (0.5 s),
                   and what it already has (queued prefills, KV handoffs, decoding requests) runs to the end; a
                   decode worker still decoding `controller.hand_on_after_s` later hands those requests on (the
                   router resumes each elsewhere, its tokens so far prefilled again: `router.migration`)
    -> wait until it has been idle for `IDLE_STABLE_S`, and at least `ROUTER_GRACE_S` after the drain began (so a
       request a router picked just before it saw DRAINING has arrived and finished too)
    -> switch its role in place (`worker_actor`: same actor, engine and cores; a new worker id) when both pools
       ask for the same resources and their engines differ only in scheduler limits (`engine.retunable`); else
       stop the actor and start a new one in the other role on the same cores.

Worker ids are `<pool>-<n>` with n counting up per pool in the registry (never reused, across control planes too),
so a moved worker gets a new id and routers see one worker leave and a new one join (and the KV pairs form around
it).

`watch` replaces a worker whose actor died (killed, crashed), or that is hung (`control_plane.hang_watch`: no
answer, or an engine stuck in one step, for `workers.hung_after_s`; it is killed first): a new worker in the same
role, on the same cores, under a new id. The routers resume that worker's requests elsewhere (`router.migration`)
when its actor's death ends their event streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time

import ray
import redis

from pdserve.config import ClusterConfig, Pool
from pdserve.control_plane.hang_watch import HangWatch
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import retunable
from pdserve.registry.entries import Role, WorkerInfo
from pdserve.registry.registry import Registry
from pdserve.worker.runtime import WorkerSpec
from pdserve.worker_actor import Worker

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 600
ROUTER_GRACE_S = 2.0
IDLE_STABLE_S = 1.0
IDLE_POLL_S = 0.25
WATCH_INTERVAL_S = 1.0
WATCH_TIMEOUT_S = 10.0
WORKER_STOP_TIMEOUT_S = 15.0
REFILL_RETRY_S = 30.0
"""How often a dead worker's slot whose replacement failed to start is tried again."""
"""How long a worker's own stop (unregister, end its engine thread, close its KV pairs) may take before its actor is
killed anyway: a stop stuck on a peer that is gone held `pdserve down` for its whole 60 s once (CI, 2026-12-06)."""
ROLE_NAMES = {Role.PREFILL: "prefill", Role.DECODE: "decode", Role.BOTH: "colocated"}


class WorkerPool:
    def __init__(self, config: ClusterConfig, namespace: str, cluster: str = "default",
                 registry: Registry | None = None) -> None:
        """`registry`: where worker numbers are counted (None: in this process only)."""
        self.config = config
        self.namespace = namespace
        self.cluster = cluster
        self.registry = registry
        self.specs: dict[str, WorkerSpec] = {}
        self.actors: dict[str, ray.actor.ActorHandle] = {}
        self.moving: set[str] = set()
        """Workers the ratio controller is moving to the other role or removing (the Scaler leaves them alone)."""
        self._next = dict.fromkeys(Role, 0)
        self.infos: dict[str, WorkerInfo] = {}
        """Each worker's own answer to the last watch (every second)."""
        self.hangs = HangWatch(config.workers.hung_after_s)
        self.unfilled: dict[str, tuple[WorkerSpec, float]] = {}
        """Dead workers' specs whose replacement failed to start, by the dead worker's id, with when to try again."""

    def pool(self, role: Role) -> Pool:
        workers = self.config.workers
        return {Role.PREFILL: workers.prefill, Role.DECODE: workers.decode, Role.BOTH: workers.colocated}[role]

    def engine(self, role: Role) -> EngineConfig:
        """The engine the role's workers run: the shared section with the pool's overrides."""
        return self.pool(role).engine_config(self.config.engine)

    def next_id(self, role: Role) -> str:
        number = self._next[role]
        if self.registry is not None:
            try:
                number = max(number, self.registry.next_worker_number(ROLE_NAMES[role]))
            except redis.RedisError as e:  # counted here alone until Redis answers again
                log.warning("worker numbers: Redis does not answer (%s); counting locally", e)
        self._next[role] = number + 1
        return f"{ROLE_NAMES[role]}-{number}"

    def actor_name(self, worker_id: str) -> str:
        return f"{self.cluster}-{worker_id}"

    async def adopt(self) -> list[str]:
        """Take over the live worker actors a previous control plane left (found by name in the namespace);
        returns their ids. An actor that does not answer is killed."""
        names = [n for n in await asyncio.to_thread(ray.util.list_named_actors)
                 if n.startswith(f"{self.cluster}-")]
        handles = await asyncio.gather(*(asyncio.to_thread(ray.get_actor, n, self.namespace) for n in names),
                                       return_exceptions=True)
        live = [(n, h) for n, h in zip(names, handles) if not isinstance(h, BaseException)]
        specs = await asyncio.gather(*(asyncio.wait_for(h.spec.remote(), WATCH_TIMEOUT_S) for _, h in live),
                                     return_exceptions=True)
        for (name, handle), spec in zip(live, specs):
            if isinstance(spec, WorkerSpec):
                self.specs[spec.worker_id], self.actors[spec.worker_id] = spec, handle
                self.hangs.watch(spec.worker_id)
                self._count_past(spec)
            else:
                log.warning("worker actor %s does not answer (%s); killing it", name, type(spec).__name__)
                ray.kill(handle)
        log.warning("adopted %d running workers: %s", len(self.specs), sorted(self.specs))
        return sorted(self.specs)

    def _count_past(self, spec: WorkerSpec) -> None:
        """Never give an adopted worker's number again."""
        match = re.fullmatch(r".*-(\d+)", spec.worker_id)
        if match:
            self._next[spec.role] = max(self._next[spec.role], int(match.group(1)) + 1)

    def counts(self) -> dict[Role, int]:
        return {role: sum(1 for s in self.specs.values() if s.role is role) for role in Role}

    async def start(self, specs: list[WorkerSpec], timeout_s: float = WORKER_START_TIMEOUT_S) -> None:
        """Start the workers together; returns once every engine is loaded and registered."""
        for spec in specs:
            self._create(spec)
        await asyncio.wait_for(asyncio.gather(*(self.actors[s.worker_id].start.remote() for s in specs)), timeout_s)
        for spec in specs:
            self.hangs.watch(spec.worker_id)

    async def move(self, worker_id: str, to_role: Role) -> str:
        """Drain `worker_id` and make it a worker in `to_role` on the same cores (in place when it can: see the
        module docstring); returns the new worker's id."""
        spec = self.specs[worker_id]
        in_place = (self.pool(spec.role).resources == self.pool(to_role).resources
                    and retunable(spec.engine, self.engine(to_role)))
        clock = asyncio.get_running_loop().time
        began = clock()
        self.moving.add(worker_id)
        try:
            await self.drain(worker_id)
            drained = clock()
            if in_place and (switched := await self._switch(worker_id, to_role)) is not None:
                _log_move(worker_id, to_role, switched, "switched in place", drained - began, clock() - drained)
                return switched
            await self.stop(worker_id)
        finally:
            self.moving.discard(worker_id)
        new_id = self.next_id(to_role)
        new = dataclasses.replace(spec, role=to_role, worker_id=new_id, actor_name=self.actor_name(new_id),
                                  engine=self.engine(to_role))
        await self.start([new])
        _log_move(worker_id, to_role, new_id, "restarted", drained - began, clock() - drained)
        return new_id

    async def _switch(self, worker_id: str, to_role: Role) -> str | None:
        """The drained actor serves in `to_role` under a new id (its actor name, how routers find it, stays);
        None if it could not (the caller restarts it instead)."""
        new = dataclasses.replace(self.specs[worker_id], role=to_role, worker_id=self.next_id(to_role),
                                  engine=self.engine(to_role))
        try:
            await asyncio.wait_for(self.actors[worker_id].switch_role.remote(new), WORKER_START_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as e:
            log.error("worker %s could not switch to %s in place; restarting it: %s", worker_id, to_role.value, e)
            return None
        del self.specs[worker_id]
        self.hangs.forget(worker_id)
        self.hangs.watch(new.worker_id)
        self.specs[new.worker_id], self.actors[new.worker_id] = new, self.actors.pop(worker_id)
        return new.worker_id

    def abandon(self, worker_id: str) -> None:
        """Kill a worker that never started (Ray could not place it, or its start failed) and forget it."""
        actor = self.actors.pop(worker_id, None)
        self.specs.pop(worker_id, None)
        self.hangs.forget(worker_id)
        if actor is not None:
            ray.kill(actor)

    async def remove(self, worker_id: str) -> None:
        await self.drain(worker_id)
        await self.stop(worker_id)

    async def drain(self, worker_id: str) -> None:
        actor = self.actors[worker_id]
        await actor.drain.remote()
        loop = asyncio.get_running_loop()
        began = loop.time()
        hand_on_after = self.config.controller.hand_on_after_s
        if self.specs[worker_id].role is not Role.DECODE:
            hand_on_after = None
        idle_since = None
        while True:
            now = loop.time()
            try:  # (idle asks the engine thread: a hung engine never answers)
                idle = await asyncio.wait_for(actor.idle.remote(), self.hangs.ask_timeout_s(WATCH_TIMEOUT_S))
            except TimeoutError:
                idle = False
            if worker_id in self.hangs.hung():  # the watch replaces it once it is no longer moving
                raise TimeoutError(f"worker {worker_id} hung while draining")
            if idle:
                idle_since = now if idle_since is None else idle_since
                if now - idle_since >= IDLE_STABLE_S and now - began >= ROUTER_GRACE_S:
                    return
            else:
                idle_since = None
                if hand_on_after is not None and now - began >= hand_on_after:
                    handed = await actor.hand_on.remote()
                    if handed:
                        log.info("worker %s handed on %d requests", worker_id, handed)
            await asyncio.sleep(IDLE_POLL_S)

    async def stop(self, worker_id: str) -> None:
        actor = self.actors.pop(worker_id, None)
        self.specs.pop(worker_id, None)
        self.hangs.forget(worker_id)
        if actor is None:  # it died and was replaced meanwhile
            return
        try:
            await asyncio.wait_for(actor.stop.remote(), WORKER_STOP_TIMEOUT_S)
        except ray.exceptions.RayError as e:
            log.warning("worker %s did not stop cleanly: %s", worker_id, e)
        except TimeoutError:
            log.warning("worker %s did not stop in %.0f s; killing its actor", worker_id, WORKER_STOP_TIMEOUT_S)
        ray.kill(actor)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(worker_id) for worker_id in list(self.actors)))

    async def watch(self) -> None:
        """Every second, replace the workers whose actors have died or that are hung, all at once; a replacement that
        failed to start is tried again every REFILL_RETRY_S."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            due = [(worker_id, spec) for worker_id, (spec, when) in self.unfilled.items() if when <= now]
            for worker_id, _ in due:
                del self.unfilled[worker_id]
            outcomes = await asyncio.gather(*(self.replace(worker_id) for worker_id in await self.dead()),
                                            *(self._refill(worker_id, spec) for worker_id, spec in due),
                                            return_exceptions=True)  # together: one slow start holds up none
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    log.error("replacing a worker failed", exc_info=outcome)

    async def dead(self) -> list[str]:
        """The workers whose actors are gone, and the hung ones (a live but busy actor still answers: `info` runs
        off its engine thread)."""
        ids = list(self.actors)
        timeout_s = self.hangs.ask_timeout_s(WATCH_TIMEOUT_S)
        answers = await asyncio.gather(*(asyncio.wait_for(self.actors[i].info.remote(), timeout_s) for i in ids),
                                       return_exceptions=True)
        self.infos = {i: answer for i, answer in zip(ids, answers) if isinstance(answer, WorkerInfo)}
        for worker_id, info in self.infos.items():
            self.hangs.answered(worker_id, info)
        dead = [i for i, answer in zip(ids, answers) if isinstance(answer, ray.exceptions.RayActorError)]
        for worker_id, seconds in self.hangs.hung().items():
            if worker_id in self.actors and worker_id not in dead and worker_id not in self.moving:
                log.error("worker %s is hung: no answer, or its engine inside one step, for %.1f s (workers."
                          "hung_after_s %.1f); killing it", worker_id, seconds, self.hangs.hung_after_s)
                dead.append(worker_id)
        return dead

    def running(self, worker_id: str) -> int:
        """The worker's running plus waiting requests, as it said in the last watch (0 when unknown)."""
        info = self.infos.get(worker_id)
        return info.running + info.waiting if info is not None else 0

    async def replace(self, worker_id: str) -> str | None:
        """Start a worker in a dead one's role and cores; returns its id (None if `worker_id` has left meanwhile)."""
        spec = self.specs.get(worker_id)
        actor = self.actors.pop(worker_id, None)
        if spec is None or actor is None:
            return None
        del self.specs[worker_id]
        self.hangs.forget(worker_id)
        ray.kill(actor)  # a hung one too: Ray stops even a stopped process (SIGKILL once its grace ends)
        return await self._refill(worker_id, spec)

    async def _refill(self, dead_id: str, spec: WorkerSpec) -> str | None:
        """Start a worker like `spec` in dead `dead_id`'s place; its id, or None if it failed to start (it is then
        killed, and `watch` tries again later: a slot never stays filled by a worker that never served)."""
        new_id = self.next_id(spec.role)
        new = dataclasses.replace(spec, worker_id=new_id, actor_name=self.actor_name(new_id))
        log.warning("worker %s died; starting %s in its place", dead_id, new_id)
        try:
            await self.start([new])
        except (ray.exceptions.RayError, TimeoutError) as e:
            self.abandon(new_id)
            self.unfilled[dead_id] = (spec, time.monotonic() + REFILL_RETRY_S)
            log.error("worker %s could not start in %s's place (tried again in %.0f s): %s", new_id, dead_id,
                      REFILL_RETRY_S, e)
            return None
        return new_id

    def _create(self, spec: WorkerSpec) -> None:
        resources = self.pool(spec.role).resources
        actor = ray.remote(Worker).options(name=spec.actor_name, namespace=self.namespace, num_cpus=resources.cpus,
                                           num_gpus=resources.gpus, max_concurrency=1000, lifetime="detached")
        self.specs[spec.worker_id] = spec
        self.actors[spec.worker_id] = actor.remote(spec)


def _log_move(worker_id: str, to_role: Role, new_id: str, how: str, drain_s: float, switch_s: float) -> None:
    log.warning("worker %s moved to %s as %s: drained in %.2f s, %s in %.2f s", worker_id, to_role.value, new_id,
                drain_s, how, switch_s)
