"""Which workers a request goes to, and waiting until some can take it.

    placed = await placement.reserve(request, key, owner, on_choice)   # disaggregated: decode, prefill, reservation
    worker = await placement.colocated(request)
    found = await placement.adopt(client_request_id, client_has, digest)   # a resumed request: which worker holds it

Disaggregated: the decode worker with the most free KV blocks (KV-aware: the cheapest by `router.policy`'s cost, from
what `index` says each worker caches) among those with a working KV pair to some prefill worker reserves the
request's blocks; then the prefill worker paired with it with the fewest queued prompt tokens (counting what this
router has sent it and not yet seen back). No room on any decode worker: wait until a request ends at this router
(ROOM_RETRY_S at most) and pick again; a request that ends wakes the longest waiter only, and a waiter that then
finds room wakes the next, so a freed block costs one reserve call, not one per waiting request. Colocated: the
worker with the most free blocks. No ready worker at all: wait up to `worker_wait_s` (router.worker_wait_s) for one
to join (a replacement for a worker that died, a request resumed from it included), then
`Unavailable`. Ray errors of the calls made here (`reserve`, `adopt`) are the caller's to handle.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass

import ray

from pdserve.engine.block_manager import blocks_for
from pdserve.engine.prefix_hash import block_hashes, shareable_blocks
from pdserve.registry.entries import Role, WorkerInfo
from pdserve.router.errors import Unavailable
from pdserve.router.kv_index import KVIndex
from pdserve.router.membership import Member, Membership
from pdserve.router.policy import Affinity, pick_decode, pick_prefill
from pdserve.router.request_builder import InvalidRequest, ValidRequest
from pdserve.worker.messages import Adoption, DecodeTask, Owner, Reservation

ROOM_RETRY_S = 0.5
"""A request waiting for KV room tries again when another request ends, or after this long (a heartbeat)."""
WORKER_WAIT_S = 30.0
"""router.worker_wait_s's default: a dead worker's replacement took ~12 s under load on dev-cpu."""
CHOOSE_RETRY_S = 0.1
ADOPT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Placed:
    """Where a disaggregated request goes: the decode worker that reserved its blocks, the prefill worker paired with
    it, the reservation, and the prompt tokens that prefill worker is expected to compute (less the prefix it caches,
    as far as this router knows), which count in its queue until it answers."""

    decode: Member
    prefill: Member
    reservation: Reservation
    prefill_tokens: int


class Placement:
    def __init__(self, membership: Membership, block_size: int, index: KVIndex | None = None,
                 cache_weight: float = 1.0, worker_wait_s: float = WORKER_WAIT_S) -> None:
        """`index`: KV-aware routing from the workers' cache events (None: by load alone); `worker_wait_s`: how
        long a request waits for a worker to join when none is ready."""
        self.membership = membership
        self.worker_wait_s = worker_wait_s
        self.block_size = block_size
        self.index = index
        self.cache_weight = cache_weight
        self.prefill_tokens: dict[str, int] = defaultdict(int)
        """Prompt tokens this router has sent each prefill worker and not yet seen back."""
        self._waiters: deque[asyncio.Future] = deque()
        """Requests waiting for KV room, oldest first; a request that ends wakes the first still waiting."""

    async def reserve(self, request: ValidRequest, key: str, owner: Owner,
                      on_choice: Callable[[Member, Member], None]) -> Placed:
        """A decode worker with room that reserved the request (under `key`, for `owner`), and a prefill worker
        paired with it; waits while every decode worker is full. `on_choice(decode, prefill)` runs before each
        reservation is asked for (so an abort reaches a worker that may know the request)."""
        affinity = self._affinity(request)
        waited = False
        while True:
            decode = await self._choose(lambda: self._fitting(request, pick_decode(
                [m.info for m in self.membership.ready(Role.DECODE) if self.membership.prefill_for(m.info.worker_id)],
                affinity)))
            prefill_info = pick_prefill([m.info for m in self.membership.prefill_for(decode.info.worker_id)],
                                        self.prefill_tokens, affinity)
            prefill = self.membership.members.get(prefill_info.worker_id) if prefill_info else None
            if prefill is None:
                continue
            on_choice(decode, prefill)
            reservation = await decode.handle.reserve.remote(
                DecodeTask(key, request.token_ids, request.sampling, owner, prefill.info.worker_id,
                           request.resumed_tokens, request.priority))
            if reservation is not None:
                self.membership.update(decode.info.worker_id, kv_blocks_used=decode.info.kv_blocks_total
                                       - reservation.kv_blocks_free, running=reservation.running)
                self._expect(affinity, decode, prefill)
                if waited:
                    self.room_freed()  # room may be left for the next waiter: pass the turn on
                tokens = affinity.uncached_tokens(prefill.info.worker_id) if affinity else len(request.token_ids)
                return Placed(decode, prefill, reservation, tokens)
            self.membership.update(decode.info.worker_id, kv_blocks_used=decode.info.kv_blocks_total)  # full
            await self._wait_for_room()
            waited = True

    async def colocated(self, request: ValidRequest) -> Member:
        affinity = self._affinity(request)
        worker = await self._choose(lambda: self._fitting(request, pick_decode(
            [m.info for m in self.membership.ready(Role.BOTH)], affinity)))
        self._expect(affinity, worker)
        return worker

    async def adopt(self, client_request_id: str, client_has: int,
                    prompt_digest: str) -> tuple[Member, Adoption] | None:
        """Ask every decode (or colocated) worker to hand this router the request (of that prompt); the one that
        holds it answers with what its client lacks. None when no worker holds it (or none answers in time)."""
        members = [m for m in self.membership.members.values() if m.info.role in (Role.DECODE, Role.BOTH)]
        answers = await asyncio.gather(*(asyncio.wait_for(m.handle.adopt.remote(
            client_request_id, self.membership.router_id, client_has, prompt_digest), ADOPT_TIMEOUT_S)
            for m in members),
            return_exceptions=True)
        for member, answer in zip(members, answers):
            if isinstance(answer, Adoption):
                return member, answer
            if isinstance(answer, BaseException) and not isinstance(answer, (ray.exceptions.RayError, TimeoutError)):
                raise answer
        return None

    def _affinity(self, request: ValidRequest) -> Affinity | None:
        """What the index says each worker holds of this prompt (None without an index)."""
        if self.index is None:
            return None
        tokens = request.token_ids
        shareable = shareable_blocks(len(tokens), self.block_size)
        hashes = block_hashes(tokens[:shareable * self.block_size], self.block_size)
        cached = self.index.cached_blocks(hashes, self.membership.members)
        return Affinity(len(tokens), shareable, self.block_size, cached, self.cache_weight, tuple(hashes))

    def _expect(self, affinity: Affinity | None, *workers: Member) -> None:
        """The chosen workers will hold the prompt's blocks before their events say so."""
        if affinity is not None:
            for member in workers:
                self.index.expect(member.info.worker_id, affinity.hashes)

    def room_freed(self) -> None:
        """A request ended (blocks may be free): the longest waiter tries again."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _wait_for_room(self) -> None:
        """Until a request ends somewhere (or a heartbeat may show room: ROOM_RETRY_S at most)."""
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()  # those that timed out (oldest first, as they all wait as long)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, ROOM_RETRY_S)
        except TimeoutError:
            pass  # its place is skipped (a done future) when a request ends

    async def _choose(self, pick: Callable[[], WorkerInfo | None]) -> Member:
        """The member `pick` names; waits a while for one to join when there is none."""
        deadline = asyncio.get_running_loop().time() + self.worker_wait_s
        while True:
            info = pick()
            if info is not None and info.worker_id in self.membership.members:
                return self.membership.members[info.worker_id]
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(f"no ready worker for this request within {self.worker_wait_s:.0f} s "
                                  "(router.worker_wait_s; see `pdserve status`)")
            await asyncio.sleep(CHOOSE_RETRY_S)

    def output_room(self, prompt_tokens: int) -> int | None:
        """Tokens of output that fit after a prompt of `prompt_tokens` in the KV cache of every ready decode (or
        colocated) worker; None while none is ready."""
        totals = [m.info.kv_blocks_total for role in (Role.DECODE, Role.BOTH) for m in self.membership.ready(role)]
        return min(totals) * self.block_size - prompt_tokens if totals else None

    def _fitting(self, request: ValidRequest, info: WorkerInfo | None) -> WorkerInfo | None:
        if info is not None and blocks_for(len(request.token_ids) + request.sampling.max_tokens,
                                           self.block_size) > info.kv_blocks_total:
            raise InvalidRequest(f"sampling.max_tokens: prompt + max_tokens needs more KV blocks than a worker has "
                                 f"({info.kv_blocks_total} of {self.block_size} tokens)")
        return info
