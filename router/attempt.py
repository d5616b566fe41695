"""One attempt at a request on chosen workers, as the outputs its client gets.

    attempt = Attempt(parts, request, key, position, clock, dispatched)   # position: tokens the client has
    async for item in attempt.run():          # Output ... and then an Output with a finish reason, or an AttemptEnd
    attempt.release(finished)                 # abort it on every worker it reached, unless it finished

Three kinds, by how it starts:
- disaggregated: reserve on a decode worker -> prefill on a prefill worker paired with it, which sends the KV and
  announces it to the decode worker -> the first token from the prefill's answer -> the decode worker's events;
- colocated: generate on one worker -> its events;
- taken over: a resumed request that another router started; the decode worker handed it to this router
  (`placement.adopt`) with the events its client lacks -> then its events.

Each output carries its position in the client's output (the orchestrator passes on only what the client lacks).
An attempt ends with the request (an output with a finish reason), or with an `AttemptEnd` saying why it stopped
short: a worker died or failed the request (WORKER_LOST), the decode worker is leaving its pool and gave it back
(HANDED_ON), or another router took it over (TAKEN_OVER).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import ray

from pdserve.engine.logprobs import TokenLogprobs
from pdserve.engine.request import FinishReason
from pdserve.router.errors import WorkerError
from pdserve.router.event_streams import EventStreams
from pdserve.router.membership import Member, Membership
from pdserve.router.placement import Placement
from pdserve.router.request_builder import ValidRequest
from pdserve.router.timings import RequestClock
from pdserve.worker.messages import Adoption, DecodeTask, Owner, PrefillTask, TokenEvent, prompt_digest

log = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 30.0
"""How long an abort's answer is waited for in the background."""


def request_key(request_id: str, router_id: str, serial: int) -> str:
    """The id the workers know an attempt by: unique in the cluster (two routers never collide, even on one client
    id) and never used twice by a router (`serial` counts its attempts), so a late event or acknowledgement of an
    earlier attempt never touches another, even of a request id a client sends again."""
    return f"{request_id}@{router_id}#{serial}"


@dataclass(frozen=True)
class Output:
    position: int
    """Where `token_ids` start in the client's output."""
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()
    """One per token of `token_ids`, when the request asked for them."""
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    """With the first token, when the request asked for them."""


class EndKind(enum.Enum):
    WORKER_LOST = "worker lost"
    HANDED_ON = "handed on"
    TAKEN_OVER = "taken over"


@dataclass(frozen=True)
class AttemptEnd:
    kind: EndKind
    reason: str
    dead_worker: str = ""
    """The worker whose actor died, when that is what happened."""


@dataclass(frozen=True)
class RouterParts:
    """What every attempt at this router uses."""

    router_id: str
    membership: Membership
    placement: Placement
    streams: EventStreams
    colocated: bool


class _WorkerLost(Exception):
    """A call to a worker failed because its actor is gone (turned into an AttemptEnd inside `run`)."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id


class Attempt:
    def __init__(self, parts: RouterParts, request: ValidRequest, key: str, position: int, clock: RequestClock,
                 dispatched: Callable[[], None], adoption: tuple[Member, Adoption] | None = None) -> None:
        """`request`: what to run (for a resumed request, its prompt plus the tokens its client has);
        `dispatched()`: called once a worker has taken the request; `adoption`: the worker that handed this router
        a request another router started, and what it handed over."""
        self.parts = parts
        self.request = request
        self.key = adoption[1].request_id if adoption else key
        prompt = request.token_ids[:len(request.token_ids) - request.resumed_tokens]  # the client's own prompt
        self.owner = Owner(parts.router_id, request.request_id, position, prompt_digest(prompt))
        self.clock = clock
        self.dispatched = dispatched
        self.adoption = adoption
        self.decode: Member | None = None
        """The decode (or colocated) worker, once chosen: where the request's events come from."""
        self.prefill: Member | None = None
        self.ended_on_worker = False
        """The decode worker reported the request's end: nothing to abort there."""

    @property
    def worker_ids(self) -> str:
        return ",".join(m.info.worker_id for m in (self.decode, self.prefill) if m is not None)

    async def run(self) -> AsyncIterator[Output | AttemptEnd]:
        try:
            if self.adoption is not None:
                self._take_over()
            elif self.parts.colocated:
                await self._start_colocated()
            else:
                first = await self._start_disaggregated()
                yield first
                if isinstance(first, AttemptEnd) or first.finish_reason is not None:
                    return
            async for item in self._events():
                yield item
        except _WorkerLost as e:
            yield AttemptEnd(EndKind.WORKER_LOST, f"worker {e.worker_id} failed", dead_worker=e.worker_id)

    def release(self, finished: bool) -> None:
        """After the attempt: abort it on the workers it reached (unless it finished), and tell the decode worker
        this router is done with it. The aborts are sent, not waited for: a worker that is stopped or dying must not
        hold up the request's resumption elsewhere (a lost abort costs nothing lasting: the decode worker reaps the
        request when this router's lease on it lapses)."""
        parts = self.parts
        if self.decode is not None:
            parts.streams.close(self.key)
            parts.membership.acknowledge(self.decode.info.worker_id, self.key)
        if finished and (self.ended_on_worker or self.decode is None):
            return
        if self.prefill is not None:
            _send_abort(self.prefill, self.prefill.handle.abort_prefill.remote(self.key))
        if self.decode is not None:
            _send_abort(self.decode, self.decode.handle.abort_decode.remote(self.key, parts.router_id))

    # ---- how it starts ---------------------------------------------------------------------------------------
    async def _start_disaggregated(self) -> Output | AttemptEnd:
        """Reserve, prefill; the first token (from the prefill worker's answer) or why there is none."""
        parts, request = self.parts, self.request
        try:
            placed = await parts.placement.reserve(request, self.key, self.owner, self._chose)
        except ray.exceptions.RayError as e:
            raise _failure(self.decode, e) from e
        decode, prefill, reservation = placed.decode, placed.prefill, placed.reservation
        self._dispatched(decode)
        result = await self._prefill(PrefillTask(self.key, request.token_ids, request.sampling,
                                                 decode.info.worker_id, reservation.tag, reservation.cached_blocks,
                                                 request.resumed_tokens, request.priority),
                                     placed.prefill_tokens)
        self.clock.worker_queue_s, self.clock.prefill_s = result.queue_s, result.prefill_s
        self.clock.cached_tokens = result.cached_tokens
        if result.first_token_id is None:
            return AttemptEnd(EndKind.WORKER_LOST, f"prefill worker {prefill.info.worker_id} dropped the request")
        logprobs = (result.first_logprobs,) if result.first_logprobs is not None else ()
        return Output(self.owner.position, (result.first_token_id,), result.text_delta, result.finish_reason,
                      logprobs, result.prompt_logprobs)

    async def _start_colocated(self) -> None:
        worker = await self.parts.placement.colocated(self.request)
        self.decode = worker
        self._dispatched(worker)
        await _call(worker, worker.handle.generate.remote(
            DecodeTask(self.key, self.request.token_ids, self.request.sampling, self.owner,
                       resumed_tokens=self.request.resumed_tokens, priority=self.request.priority)))

    def _take_over(self) -> None:
        worker, adoption = self.adoption
        self.decode = worker
        self.prefill = self.parts.membership.members.get(adoption.prefill_worker)
        self._dispatched(worker, adoption.events)

    def _dispatched(self, decode: Member, first: tuple[TokenEvent, ...] = ()) -> None:
        """A worker has the request: collect its events from now on."""
        self.parts.streams.open(self.key, decode.info.worker_id, first)
        self.clock.dispatched = time.monotonic()
        self.dispatched()

    def _chose(self, decode: Member, prefill: Member) -> None:
        self.decode, self.prefill = decode, prefill

    async def _prefill(self, task: PrefillTask, compute_tokens: int):
        """The prefill worker's answer; meanwhile `compute_tokens` count in its queue (`Placement.prefill_tokens`)."""
        tokens = self.parts.placement.prefill_tokens
        worker_id = self.prefill.info.worker_id
        tokens[worker_id] += compute_tokens
        try:
            return await _call(self.prefill, self.prefill.handle.prefill.remote(task))
        finally:
            tokens[worker_id] -= compute_tokens
            if not tokens[worker_id]:
                del tokens[worker_id]  # no entry left behind for a worker that is gone

    # ---- the decode worker's events --------------------------------------------------------------------------
    async def _events(self) -> AsyncIterator[Output | AttemptEnd]:
        worker_id = self.decode.info.worker_id
        while True:
            event: TokenEvent = await self.parts.streams.next(self.key)
            if event.adopted_by:
                yield AttemptEnd(EndKind.TAKEN_OVER, f"router {event.adopted_by} took the request over")
                return
            if event.handed_on:
                yield AttemptEnd(EndKind.HANDED_ON, f"worker {worker_id} is leaving its pool and handed it on")
                return
            if event.error:
                yield AttemptEnd(EndKind.WORKER_LOST, f"worker {worker_id}: {event.error}")
                return
            self._time(event)
            if event.token_ids or event.finish_reason is not None:
                yield Output(event.position, event.token_ids, event.text_delta, event.finish_reason, event.logprobs,
                             event.prompt_logprobs)
            if event.finish_reason is not None:
                self.ended_on_worker = True
                return

    def _time(self, event: TokenEvent) -> None:
        clock = self.clock
        if event.kv_transfer_s is not None and clock.first_token is not None:
            clock.kv_transfer_s = time.monotonic() - clock.first_token  # prefill done -> decoding, seen here
        if event.queue_s is not None:
            clock.worker_queue_s, clock.prefill_s = event.queue_s, event.prefill_s or 0.0
            clock.cached_tokens = event.cached_tokens
        clock.speculative_proposed += event.speculative_proposed
        clock.speculative_accepted += event.speculative_accepted


async def _call(member: Member, ref):
    """A worker call's answer."""
    try:
        return await ref
    except ray.exceptions.RayError as e:
        raise _failure(member, e) from e


def _failure(member: Member, error: ray.exceptions.RayError) -> Exception:
    """A worker call's error as what it means here: `WorkerError` if the worker raised (a bug: the request ends),
    `_WorkerLost` otherwise (its actor is gone: the request goes on elsewhere)."""
    if isinstance(error, ray.exceptions.RayTaskError) and not isinstance(error, ray.exceptions.RayActorError):
        cause = error.cause if error.cause is not None else error
        log.error("worker %s raised: %r", member.info.worker_id, cause)
        return WorkerError(f"worker {member.info.worker_id}: {type(cause).__name__}: {cause}")
    return _WorkerLost(member.info.worker_id)


_ABORTS: set[asyncio.Task] = set()
"""Aborts sent and not yet answered (kept so they are not collected before they end)."""


def _send_abort(member: Member, ref) -> None:
    """An abort, answered in the background within ABORT_TIMEOUT_S (then given up on: the worker is stopped)."""
    task = asyncio.ensure_future(asyncio.wait_for(_quietly(member, ref), ABORT_TIMEOUT_S))
    _ABORTS.add(task)
    task.add_done_callback(_abort_ended)


def _abort_ended(task: asyncio.Task) -> None:
    _ABORTS.discard(task)
    if not task.cancelled() and isinstance(task.exception(), TimeoutError):
        log.warning("an abort got no answer within %.0f s (the worker is stopped or gone)", ABORT_TIMEOUT_S)


async def _quietly(member: Member, ref) -> None:
    """An abort: a worker that is gone has nothing to abort."""
    try:
        await ref
    except ray.exceptions.RayError as e:
        log.warning("abort on %s failed: %s", member.info.worker_id, type(e).__name__)
