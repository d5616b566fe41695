"""The router's view of the workers: who is in the registry, their Ray handles, which KV pairs are formed, and the
event stream drained from every decode worker.

`run` refreshes from Redis every half second. A worker that appears gets its actor handle (by name, in the cluster's
Ray namespace), is paired with every worker of the other role (both sides call `connect` at once; the decode worker
hosts the pair's TCPStore), and, if it decodes, gets a drain task that long-polls its `events`. A worker whose
heartbeat expires and that does not answer, or whose actor dies, is dropped and `on_lost` is told, so the requests
on it move on (see `router.migration`) instead of hanging; a dead one is never taken back, though its heartbeat
lingers a few seconds. A worker missing from a restarted (empty) Redis still answers, so it stays; one whose actor
answers under another id has switched roles in place (`cluster.worker`) and is dropped (it was drained first).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
import redis
from ray.actor import ActorHandle

from pdserve.cluster.messages import TokenEvent
from pdserve.cluster.registry import Registry, Role, WorkerInfo, WorkerState

log = logging.getLogger(__name__)

REFRESH_S = 0.5
DRAIN_WAIT_S = 1.0
ALIVE_TIMEOUT_S = 2.0
PAIR_SETTLE_S = 3.0
"""A pair younger than this is not judged by heartbeats (one sent before it formed does not list it)."""


@dataclass
class Member:
    info: WorkerInfo
    handle: ActorHandle
    drain: asyncio.Task | None = None
    paired: set[str] = field(default_factory=set)
    paired_at: dict[str, float] = field(default_factory=dict)
    """When each pair was formed (a heartbeat sent before that may not list it yet)."""


class Membership:
    def __init__(self, registry: Registry, namespace: str, on_events: Callable[[list[TokenEvent]], None],
                 on_lost: Callable[[str, str], None]) -> None:
        self.registry = registry
        self.namespace = namespace
        self.members: dict[str, Member] = {}
        self._on_events = on_events
        self._on_lost = on_lost
        self._pairing: dict[tuple[str, str], asyncio.Task] = {}
        self._generations: dict[tuple[str, str], int] = {}
        """How many times each (prefill, decode) pair was formed: a pair formed again meets under a new name."""
        self._redis_failing = False
        self._checking: dict[str, asyncio.Task] = {}
        """Workers missing from the registry, being asked whether they are still alive."""
        self._dead: set[str] = set()
        """Workers whose actors died: kept out even while their last heartbeat lingers in the registry (worker ids
        are never reused; a replacement joins under a new one)."""

    # ---- queries ---------------------------------------------------------------------------------------------
    def ready(self, role: Role) -> list[Member]:
        return [m for m in self.members.values() if m.info.role is role and m.info.state is WorkerState.READY]

    def prefill_for(self, decode_id: str) -> list[Member]:
        return [m for m in self.ready(Role.PREFILL) if decode_id in m.paired]

    def running(self, worker_id: str) -> int:
        """The worker's running plus waiting requests, as its last heartbeat said (0 when it is not a member)."""
        member = self.members.get(worker_id)
        return member.info.running + member.info.waiting if member is not None else 0

    def update(self, worker_id: str, **changes) -> None:
        """Fresher load figures than the last heartbeat (from a worker's reply)."""
        member = self.members.get(worker_id)
        if member is not None:
            member.info = dataclasses.replace(member.info, **changes)

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
                log.warning("registry unreadable, keeping the last view: %s", e)
            self._redis_failing = True
            return
        self._redis_failing = False
        for worker_id in list(self.members):
            if worker_id not in infos and worker_id not in self._checking:
                self._checking[worker_id] = asyncio.create_task(self._check_gone(worker_id), name=f"check-{worker_id}")
        for worker_id, info in infos.items():
            if worker_id in self._dead:
                continue
            member = self.members.get(worker_id)
            if member is not None:
                member.info = info
                self._unpair_broken(member)
            elif info.state is WorkerState.READY:
                await self._join(info)
        self._pair_all()

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
        self._dead.add(worker_id)
        self.drop(worker_id, reason)

    def drop(self, worker_id: str, reason: str) -> None:
        member = self.members.pop(worker_id, None)
        if member is None:
            return
        log.warning("worker %s left the cluster: %s", worker_id, reason)
        if member.drain is not None:
            member.drain.cancel()
        for other in self.members.values():
            other.paired.discard(worker_id)
        self._on_lost(worker_id, reason)

    async def close(self) -> None:
        tasks = [m.drain for m in self.members.values() if m.drain is not None] + list(self._pairing.values()) + \
            list(self._checking.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _join(self, info: WorkerInfo) -> None:
        try:
            handle = await asyncio.to_thread(ray.get_actor, info.actor_name, self.namespace)
        except ValueError:
            log.warning("worker %s is registered but its actor %r is not found", info.worker_id, info.actor_name)
            return
        member = Member(info, handle)
        if info.role in (Role.DECODE, Role.BOTH):
            member.drain = asyncio.create_task(self._drain(member), name=f"drain-{info.worker_id}")
        self.members[info.worker_id] = member
        log.info("worker %s joined (%s)", info.worker_id, info.role.value)

    # ---- KV pairs --------------------------------------------------------------------------------------------
    def _unpair_broken(self, member: Member) -> None:
        """Pairs the worker's heartbeat no longer lists (a failed transfer broke them) are formed again."""
        now = asyncio.get_running_loop().time()
        listed = set(member.info.paired)
        for peer in list(member.paired):
            if peer not in listed and now - member.paired_at.get(peer, now) > PAIR_SETTLE_S:
                log.warning("KV pair %s <-> %s is broken (not in the heartbeat); forming it again",
                            member.info.worker_id, peer)
                member.paired.discard(peer)
                other = self.members.get(peer)
                if other is not None:
                    other.paired.discard(member.info.worker_id)

    def _pair_all(self) -> None:
        for p in self.ready(Role.PREFILL):
            for d in self.ready(Role.DECODE):
                key = (p.info.worker_id, d.info.worker_id)
                if d.info.worker_id not in p.paired and key not in self._pairing:
                    self._pairing[key] = asyncio.create_task(self._pair(p, d), name=f"pair-{key}")

    async def _pair(self, p: Member, d: Member) -> None:
        key = (p.info.worker_id, d.info.worker_id)
        generation = self._generations[key] = self._generations.get(key, -1) + 1
        try:
            await asyncio.gather(p.handle.connect.remote(d.info.worker_id, d.info.store_address, 0, generation),
                                 d.handle.connect.remote(p.info.worker_id, d.info.store_address, 1, generation))
            now = asyncio.get_running_loop().time()
            p.paired.add(d.info.worker_id)
            d.paired.add(p.info.worker_id)
            p.paired_at[d.info.worker_id] = d.paired_at[p.info.worker_id] = now
            log.info("KV pair %s -> %s formed", *key)
        except ray.exceptions.RayError as e:
            log.warning("KV pair %s -> %s failed (will retry): %s", *key, e)
        finally:
            self._pairing.pop(key, None)

    # ---- events ----------------------------------------------------------------------------------------------
    async def _drain(self, member: Member) -> None:
        while True:
            try:
                events = await member.handle.events.remote(DRAIN_WAIT_S)
            except ray.exceptions.RayActorError as e:
                self.dead(member.info.worker_id, f"its actor died: {type(e).__name__}")
                return
            except ray.exceptions.RayError as e:
                self.drop(member.info.worker_id, f"its actor failed: {type(e).__name__}")
                return
            if events:
                self._on_events(events)
