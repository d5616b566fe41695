"""The router's view of the workers: who is in the registry, their Ray handles, and the events this router collects
from every decode (or colocated) worker.

`run` refreshes from Redis every half second. A worker that appears gets its actor handle (by name, in the
cluster's Ray namespace) and, if it decodes, a collector task that long-polls its `events` for this router. Each
poll renews this router's lease on its requests there and acknowledges the ones it is done with. A worker whose
heartbeat expires and that does not answer, or whose actor dies, is dropped and `on_lost` is told, so the requests
on it move on (see `router.migration`) instead of hanging; a dead one is never taken back, though its heartbeat
lingers a few seconds. A worker missing from a restarted (empty) Redis still answers, so it stays; one whose actor
answers under another id has switched roles in place (`worker_actor`) and is dropped (it was drained first). While
Redis is away, the workers' own answers through Ray stand in for their heartbeats (`worker.directory`): a worker
that started meanwhile (the replacement of one that died) joins at once.

KV pairs are the prefill workers' own (`worker.kv_pairs`): a decode worker is usable with a prefill worker when
both heartbeats list their pair.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import redis

from pdserve.registry.entries import Role, WorkerInfo, WorkerState
from pdserve.registry.registry import Registry
from pdserve.worker.directory import ask_workers
from pdserve.worker.messages import TokenEvent

log = logging.getLogger(__name__)

REFRESH_S = 0.5
COLLECT_WAIT_S = 1.0
ALIVE_TIMEOUT_S = 2.0
DEAD_KEPT_S = 600.0
"""How long a dead worker's id is kept out: far beyond its last heartbeat's expiry, after which it is forgotten (the
set grew with every worker that ever died)."""


@dataclass
class Member:
    info: WorkerInfo
    handle: Any
    collector: asyncio.Task | None = None
    done: list[str] = field(default_factory=list)
    """This router's requests on it that ended: acknowledged with the next poll, so it drops their journals."""


class Membership:
    def __init__(self, registry: Registry, namespace: str, router_id: str,
                 on_events: Callable[[list[TokenEvent]], None], on_lost: Callable[[str, str], None],
                 find_actor: Callable[[str], Any] | None = None,
                 on_refresh: Callable[[list[WorkerInfo]], None] | None = None) -> None:
        """`on_refresh`: told the registry's workers after every refresh that read them (the fleet's metrics)."""
        self.registry = registry
        self.router_id = router_id
        self.members: dict[str, Member] = {}
        self._on_events = on_events
        self._on_lost = on_lost
        self._on_refresh = on_refresh
        self._namespace = namespace
        self._find_actor = find_actor or (lambda name: ray.get_actor(name, namespace=namespace))
        self._redis_failing = False
        self._checking: dict[str, asyncio.Task] = {}
        """Workers missing from the registry, being asked whether they are still alive."""
        self._dead: dict[str, float] = {}
        """Workers whose actors died: kept out even while their last heartbeat lingers in the registry (worker ids
        are never reused; a replacement joins under a new one)."""

    # ---- queries ---------------------------------------------------------------------------------------------
    def ready(self, role: Role) -> list[Member]:
        return [m for m in self.members.values() if m.info.role is role and m.info.state is WorkerState.READY]

    def prefill_for(self, decode_id: str) -> list[Member]:
        """Ready prefill workers with a working KV pair to `decode_id` (both heartbeats list it)."""
        decode = self.members.get(decode_id)
        if decode is None:
            return []
        return [m for m in self.ready(Role.PREFILL)
                if decode_id in m.info.paired and m.info.worker_id in decode.info.paired]

    def running(self, worker_id: str) -> int:
        """The worker's running plus waiting requests, as its last heartbeat said (0 when it is not a member)."""
        member = self.members.get(worker_id)
        return member.info.running + member.info.waiting if member is not None else 0

    def update(self, worker_id: str, **changes) -> None:
        """Fresher load figures than the last heartbeat (from a worker's reply)."""
        member = self.members.get(worker_id)
        if member is not None:
            member.info = dataclasses.replace(member.info, **changes)

    def acknowledge(self, worker_id: str, request_id: str) -> None:
        """This router is done with `request_id` on `worker_id` (told with the next poll)."""
        member = self.members.get(worker_id)
        if member is not None:
            member.done.append(request_id)

    # ---- refresh ---------------------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(REFRESH_S)

    async def refresh(self) -> None:
        try:
            infos = {w.worker_id: w for w in await asyncio.to_thread(self.registry.workers)}
        except redis.RedisError as e:
            if not self._redis_failing:
                log.warning("registry unreadable (%s); asking the workers through Ray meanwhile", e)
            self._redis_failing = True
            await self._refresh_through_ray()
            return
        self._redis_failing = False
        if self._on_refresh is not None:
            self._on_refresh(list(infos.values()))
        self._forget_long_dead()
        for worker_id in list(self.members):
            if worker_id not in infos and worker_id not in self._checking:
                self._checking[worker_id] = asyncio.create_task(self._check_gone(worker_id), name=f"check-{worker_id}")
        for worker_id, info in infos.items():
            if worker_id in self._dead:
                continue
            member = self.members.get(worker_id)
            if member is not None:
                member.info = info
            elif info.state is WorkerState.READY:
                await self._join(info)

    async def _refresh_through_ray(self) -> None:
        """Redis is away: each worker's own answer replaces its heartbeat, and new workers join. A member that does
        not answer stays (its collector finds out if it died)."""
        known = {m.info.actor_name: m.handle for m in self.members.values()}
        try:
            found = await ask_workers(self._namespace, self.registry.cluster, known)
        except (ray.exceptions.RayError, RuntimeError) as e:
            log.warning("Ray does not list the workers either, keeping the last view: %s", e)
            return
        for info, handle in found.values():
            if info.worker_id in self._dead:
                continue
            member = self.members.get(info.worker_id)
            if member is not None:
                member.info = info
            elif info.state is WorkerState.READY:
                self.join(info, handle)

    async def _check_gone(self, worker_id: str) -> None:
        """A worker's registry entry is gone: drop it only if its actor does not answer either. A restarted Redis
        comes back empty, and its workers' next heartbeats (within a second) fill it again: nothing is lost."""
        member = self.members.get(worker_id)
        try:
            if member is not None:
                answer = await asyncio.wait_for(member.handle.info.remote(), ALIVE_TIMEOUT_S)
                if answer.worker_id != worker_id:
                    self.drop(worker_id, f"its actor switched roles and serves as {answer.worker_id} now")
                    return
                log.info("worker %s is missing from the registry but answers (stopping, or Redis restarted); "
                         "keeping it until it stops answering", worker_id)
        except (ray.exceptions.RayError, TimeoutError) as e:
            self.drop(worker_id, f"its heartbeat expired and it does not answer ({type(e).__name__})")
        finally:
            self._checking.pop(worker_id, None)

    def dead(self, worker_id: str, reason: str) -> None:
        """The worker's actor died (a call to it failed so): drop it now and never take it back."""
        self._dead[worker_id] = time.monotonic()
        self.drop(worker_id, reason)

    def _forget_long_dead(self) -> None:
        cutoff = time.monotonic() - DEAD_KEPT_S
        for worker_id in [w for w, died in self._dead.items() if died < cutoff]:
            del self._dead[worker_id]

    def drop(self, worker_id: str, reason: str) -> None:
        member = self.members.pop(worker_id, None)
        if member is None:
            return
        log.warning("worker %s left the cluster: %s", worker_id, reason)
        if member.collector is not None:
            member.collector.cancel()
        self._on_lost(worker_id, reason)

    async def close(self) -> None:
        tasks = [m.collector for m in self.members.values() if m.collector is not None] + list(self._checking.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _join(self, info: WorkerInfo) -> None:
        try:
            handle = await asyncio.to_thread(self._find_actor, info.actor_name)
        except ValueError:
            log.warning("worker %s is registered but its actor %r is not found", info.worker_id, info.actor_name)
            return
        self.join(info, handle)

    def join(self, info: WorkerInfo, handle: Any) -> None:
        """`info`'s worker is a member from now on, reached through `handle` (its actor's)."""
        member = Member(info, handle)
        if info.role in (Role.DECODE, Role.BOTH):
            member.collector = asyncio.create_task(self._collect(member), name=f"collect-{info.worker_id}")
        self.members[info.worker_id] = member
        log.info("worker %s joined (%s)", info.worker_id, info.role.value)

    # ---- events ----------------------------------------------------------------------------------------------
    async def _collect(self, member: Member) -> None:
        while True:
            done, member.done = member.done, []
            try:
                events = await member.handle.events.remote(self.router_id, COLLECT_WAIT_S, done)
            except ray.exceptions.RayActorError as e:
                self.dead(member.info.worker_id, f"its actor died: {type(e).__name__}")
                return
            except ray.exceptions.RayError as e:
                self.drop(member.info.worker_id, f"its actor failed: {type(e).__name__}")
                return
            if events:
                self._on_events(events)
