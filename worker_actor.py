"""The Ray actor behind every worker: a prefill or a decode (or colocated) worker now, and able to switch roles in
place, keeping its engine (weights loaded, KV pool allocated, threads pinned) instead of restarting.

It sits above the two role packages: the request life is the role's own (`prefill_worker.worker`,
`decode_worker.worker`); this class only passes each call to the role it has now. The control plane creates it
detached, so it outlives the process that created it (a control plane or a router may die; the workers serve on),
and routers find it by name.

A role switch (`control_plane.worker_pool.WorkerPool.move`):

    drain -> idle (nothing queued, decoding, on the wire, or with events uncollected)
    -> switch_role(spec): the old identity leaves (registry entry, KV pairs, metrics port), the engine thread stays
       (and takes the new pool's scheduler limits)
    -> a worker of the other role starts on it under a new id (same actor name); routers see one worker leave and a
       new one join, and the KV pairs form again around it.

A call that only the other role answers (a late `events` poll or `abort` addressed to the identity this actor had
before a switch) finds nothing here: `events` waits and returns none, an abort does nothing. A call that would give
it work of the wrong role (`prefill` on a decode worker) is refused with `WrongRole`.

An actor whose engine thread died (a bug in a step) exits at the next `info` or `events` call, so that it is
treated as a crashed worker (replaced; its requests resumed elsewhere) instead of answering while serving nothing.

The role packages (and with them the engine and torch) are imported when an actor is made, not with this module:
every process that looks an actor up by name imports this module (Ray does, to read the class's methods), routers
included, and a router has no use for torch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import ray

from pdserve.registry.entries import Role, WorkerInfo, WorkerState
from pdserve.worker.messages import (
    Adoption,
    DecodeTask,
    FirstToken,
    KVAnnouncement,
    PrefillResult,
    PrefillTask,
    Reservation,
    TokenEvent,
)

if TYPE_CHECKING:
    from pdserve.decode_worker.worker import DecodeWorker
    from pdserve.engine.step_profile import StepProfile
    from pdserve.prefill_worker.worker import PrefillWorker
    from pdserve.worker.engine_thread import EngineThread
    from pdserve.worker.runtime import WorkerSpec

log = logging.getLogger(__name__)


class WrongRole(RuntimeError):
    """A call for the other role (the router's view of this worker is out of date)."""


class RoleSwitchError(RuntimeError):
    """A role switch asked of a worker that is not drained and idle."""


def role_front(spec: WorkerSpec, thread: EngineThread | None = None) -> PrefillWorker | DecodeWorker:
    """The worker object for `spec`'s role, on `thread`'s engine when given: a PrefillWorker for prefill, a
    DecodeWorker for decode and colocated."""
    from pdserve.decode_worker.worker import DecodeWorker
    from pdserve.prefill_worker.worker import PrefillWorker

    if spec.role is Role.PREFILL:
        return PrefillWorker(spec, thread=thread)
    return DecodeWorker(spec, thread=thread)


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.front = role_front(spec)

    # ---- every role ------------------------------------------------------------------------------------------
    async def start(self) -> WorkerInfo:
        return await self.front.start()

    async def spec(self) -> WorkerSpec:
        """Who this actor is now (a control plane that adopts running workers asks)."""
        return self.front.runtime.spec

    async def connect(self, peer: str, store_address: str, rank: int, generation: int = 0) -> None:
        await self.front.connect(peer, store_address, rank, generation)

    async def info(self) -> WorkerInfo:
        """This worker's state. An actor whose engine thread died exits here instead (the pool's watch asks every
        second): the pool starts a worker in its place and routers resume its requests elsewhere, as after a crash."""
        self._exit_if_engine_died()
        return await self.front.info()

    async def metrics(self) -> list:
        return await self.front.metrics()

    async def profile(self) -> StepProfile:
        return await self.front.profile()

    async def drain(self) -> None:
        await self.front.drain()

    async def idle(self) -> bool:
        return await self.front.idle()

    async def stop(self) -> None:
        await self.front.stop()

    async def switch_role(self, spec: WorkerSpec) -> WorkerInfo:
        """Serve as `spec` (the other role, a new worker id) on this actor's engine; returns the new identity's
        info once it is registered. Only a drained, idle worker switches (else `RoleSwitchError`)."""
        runtime = self.front.runtime
        idle = await self.front.idle()
        if runtime.state is not WorkerState.DRAINING or not idle:
            raise RoleSwitchError(f"worker {runtime.spec.worker_id} is {runtime.state.value} and "
                                  f"{'idle' if idle else 'busy'}: drain it until idle first")
        thread = await self.front.leave()
        await asyncio.wrap_future(thread.call(lambda engine: engine.retune(spec.engine)))
        self.front = role_front(spec, thread)
        return await self.front.start()

    # ---- prefill ---------------------------------------------------------------------------------------------
    async def prefill(self, task: PrefillTask) -> PrefillResult:
        return await self._prefill_front("prefill").prefill(task)

    async def abort_prefill(self, request_id: str) -> None:
        """An abort for the role this actor no longer has finds nothing."""
        if not self._decodes():
            await self.front.abort(request_id)

    # ---- decode ----------------------------------------------------------------------------------------------
    async def reserve(self, task: DecodeTask) -> Reservation | None:
        return await self._decode_front("reserve").reserve(task)

    async def announce(self, announcement: KVAnnouncement) -> None:
        await self._decode_front("announce").announce(announcement)

    async def first_token(self, token: FirstToken) -> None:
        await self._decode_front("first_token").first_token(token)

    async def generate(self, task: DecodeTask) -> None:
        await self._decode_front("generate").generate(task)

    async def abort_decode(self, request_id: str, router_id: str) -> None:
        if self._decodes():
            await self.front.abort(request_id, router_id)

    async def adopt(self, client_request_id: str, router_id: str, client_has: int,
                    prompt_digest: str) -> Adoption | None:
        if self._decodes():
            return await self.front.adopt(client_request_id, router_id, client_has, prompt_digest)
        return None

    async def hand_on(self) -> int:
        return await self._decode_front("hand_on").hand_on()

    async def events(self, router_id: str, timeout_s: float = 1.0, done: Iterable[str] = ()) -> list[TokenEvent]:
        self._exit_if_engine_died()  # routers poll this without pause: they learn of it at once
        if self._decodes():
            return await self.front.events(router_id, timeout_s, done)
        await asyncio.sleep(timeout_s)  # a poll for the decode worker this actor was before a switch
        return []

    def _exit_if_engine_died(self) -> None:
        failure = self.front.runtime.thread.failure
        if failure is not None:
            log.critical("worker %s exits: its engine thread died (%s: %s)", self.front.runtime.spec.worker_id,
                         type(failure).__name__, failure)
            ray.actor.exit_actor()

    def _decodes(self) -> bool:
        """Whether the role now is one a DecodeWorker serves (decode or colocated: `role_front`)."""
        return self.front.runtime.spec.role is not Role.PREFILL

    def _prefill_front(self, call: str) -> PrefillWorker:
        if self._decodes():
            raise WrongRole(f"{call}: worker {self.front.runtime.spec.worker_id} is not a prefill worker")
        return cast("PrefillWorker", self.front)

    def _decode_front(self, call: str) -> DecodeWorker:
        if not self._decodes():
            raise WrongRole(f"{call}: worker {self.front.runtime.spec.worker_id} is not a decode worker")
        return cast("DecodeWorker", self.front)
