"""The life of a request at a router, top to bottom.

    admitted (`admission`: a duplicate id or a full queue is refused at once)
    -> a resumed request (its client reconnected, holding some tokens) is first offered to the workers: the one
       still running it hands it to this router (`placement.adopt`), with the tokens the client lacks
    -> otherwise an attempt runs it (`attempt`): reserve on a decode worker, prefill on a prefill worker paired
       with it, stream the decode worker's events (colocated: one worker does both)
    -> the client gets each output once: an output repeating tokens the client has is cut to what it lacks
    -> the attempt ends with the request, or stops short: a worker failed or gave the request back, and a new
       attempt resumes it elsewhere from the tokens sent so far (`migration`, at most MAX_MIGRATIONS times), or
       another router took it over (its client reconnected there: this stream ends)
    -> the last piece carries the finish reason and the timings, which are recorded (`records`).

Whatever ends the stream early (the client cancels or disconnects, an error) lands in the attempt's release, which
aborts the request on every worker it reached, so blocks are freed on both sides.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from pdserve.engine.logprobs import TokenLogprobs
from pdserve.engine.request import FinishReason
from pdserve.registry.registry import Registry
from pdserve.router.admission import Admission, Ticket
from pdserve.router.attempt import Attempt, AttemptEnd, EndKind, Output, RouterParts, request_key
from pdserve.router.errors import TakenOver, Unavailable
from pdserve.router.event_streams import EventStreams
from pdserve.router.kv_index import KVIndex
from pdserve.router.membership import Membership
from pdserve.router.metrics import RouterMetrics
from pdserve.router.migration import MAX_MIGRATIONS, continuation
from pdserve.router.placement import WORKER_WAIT_S, Placement
from pdserve.router.priority_gate import PriorityGate, is_low_priority
from pdserve.router.records import TimingRecords
from pdserve.router.request_builder import ValidRequest
from pdserve.router.timings import RequestClock, Timings
from pdserve.worker.messages import prompt_digest

log = logging.getLogger(__name__)

MIGRATION_BACKOFF_S = 1.0
"""Before resuming a request for the n-th time, wait n - 1 times this (a failure that repeats at once has a cause
that a moment may clear: a heartbeat still to expire, a broken KV pair to be formed again)."""


@dataclass(frozen=True)
class Piece:
    """What the client gets next: new tokens and text; the last piece has the finish reason and timings."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    timings: Timings | None = None
    completion_tokens: int = 0
    """On the last piece: every token the client has (a resumed request's earlier ones too)."""
    logprobs: tuple[TokenLogprobs, ...] = ()
    """One per token of `token_ids`, when the request asked for them."""
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    """On the first piece, when the request asked for them."""


class Orchestrator:
    def __init__(self, registry: Registry | None, namespace: str, colocated: bool, block_size: int,
                 max_waiting: int = 1024, router_id: str = "router", kv_index: KVIndex | None = None,
                 cache_weight: float = 1.0, worker_wait_s: float = WORKER_WAIT_S,
                 low_priority_limit: int = 8) -> None:
        """`registry`: where finished requests' timings go (None: nowhere, as in unit tests). `kv_index`: routes
        by what workers cache too (`router.policy`), with `cache_weight`. `worker_wait_s`: how long a request waits
        for a worker to join when none is ready (`placement`). `low_priority_limit`: low-priority requests with
        workers at once (`priority_gate`)."""
        self.router_id = router_id
        self.registry = registry
        self.colocated = colocated
        self.gate = PriorityGate(low_priority_limit)
        self.admission = Admission(max_waiting, self.gate)
        self.streams = EventStreams()
        self.metrics = RouterMetrics(in_flight=lambda: self.in_flight_count)
        self.membership = Membership(registry, namespace, router_id, self.streams.deliver, self.streams.lost,
                                     on_refresh=self.metrics.fleet.observe)
        self.placement = Placement(self.membership, block_size, kv_index, cache_weight, worker_wait_s)
        self.parts = RouterParts(router_id, self.membership, self.placement, self.streams, colocated)
        self.records = TimingRecords(registry, self.metrics)
        self._serials = itertools.count()
        """Numbers this router's attempts (`attempt.request_key`)."""

    @property
    def in_flight_count(self) -> int:
        """Requests accepted and not yet ended."""
        return self.admission.in_flight_count

    @property
    def waiting_count(self) -> int:
        """Requests accepted and not yet given a worker."""
        return self.admission.waiting_count

    async def generate(self, request: ValidRequest,
                       admitted: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[Piece]:
        """The request's pieces; `admitted()` is awaited once the router has taken it (not refused)."""
        ticket = self.admission.admit(request)  # before `try`: a refused request was never counted
        sent = list(request.resume.token_ids) if request.resume else []
        clock = RequestClock()
        try:
            with ticket:
                if admitted is not None:
                    await admitted()
                low = is_low_priority(request.priority)
                if low:
                    await self.gate.enter(request.priority)
                try:
                    async with aclosing(self._life(request, ticket, sent, clock)) as life:  # closed with this one
                        async for piece in life:
                            yield piece
                finally:
                    if low:
                        self.gate.leave()
        except BaseException as e:
            if not clock.finished:
                self.metrics.failed(e)
            raise
        finally:
            self.placement.room_freed()

    async def _life(self, request: ValidRequest, ticket: Ticket, sent: list[int],
                    clock: RequestClock) -> AsyncIterator[Piece]:
        adoption = None
        if request.resume is not None:
            adoption = await self.placement.adopt(request.request_id, len(sent), prompt_digest(request.token_ids))
            self.metrics.resumes.labels(how="taken_over" if adoption else "rerun").inc()
        for number in range(MAX_MIGRATIONS + 1):
            attempt_request = continuation(request, sent)
            if attempt_request is None:  # every token was sent before the worker failed; only the end was lost
                yield self._last(request, clock, Output(len(sent), (), "", FinishReason.LENGTH), sent, "")
                return
            ticket.waiting()
            key = request_key(request.request_id, self.router_id, next(self._serials))
            attempt = Attempt(self.parts, attempt_request, key, len(sent), clock, ticket.dispatched, adoption)
            adoption = None
            end = None
            async with aclosing(self._through(attempt, request, sent, clock)) as items:
                async for item in items:
                    if isinstance(item, AttemptEnd):
                        end = item
                    else:
                        yield item
            if end is None:
                return  # the request ended: its last piece is sent
            await self._interrupted(request, end, number, len(sent))
        raise Unavailable(f"request {request.request_id}: resumed {MAX_MIGRATIONS} times, failed each time")

    async def _through(self, attempt: Attempt, request: ValidRequest, sent: list[int],
                       clock: RequestClock) -> AsyncIterator[Piece | AttemptEnd]:
        """One attempt: the pieces its client lacks, up to the last one (with the finish reason and timings), or
        up to the `AttemptEnd` that stopped it short. However it ends, the attempt is released (aborted on its
        workers unless it finished)."""
        finished = False
        try:
            async with aclosing(attempt.run()) as items:
                async for item in items:
                    if isinstance(item, AttemptEnd):
                        yield item
                        return
                    piece = self._unseen(item, sent, clock)
                    if item.finish_reason is not None:
                        finished = True
                        yield self._last(request, clock, item, sent, attempt.worker_ids, piece)
                        return
                    if piece is not None:
                        yield piece
            yield AttemptEnd(EndKind.WORKER_LOST, "its stream ended before the request did")
        finally:
            attempt.release(finished)

    def _unseen(self, output: Output, sent: list[int], clock: RequestClock) -> Piece | None:
        """The part of `output` the client lacks (its tokens and their text), recorded as sent; None if nothing."""
        skip = max(0, len(sent) - output.position)
        if skip and skip < len(output.token_ids):
            log.warning("an output straddles what the client has (at %d, %d tokens, client has %d)",
                        output.position, len(output.token_ids), len(sent))
        tokens = output.token_ids[skip:]
        if not tokens:
            return None
        logprobs = output.logprobs[skip:]
        prompt_logprobs = output.prompt_logprobs if not sent else None  # the client's first piece only
        sent.extend(tokens)
        gap = clock.tokens_sent(len(tokens))
        if gap is not None:
            self.metrics.inter_token.observe(gap)
        return Piece(tokens, output.text, logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    async def _interrupted(self, request: ValidRequest, end: AttemptEnd, number: int, tokens: int) -> None:
        """An attempt stopped short: what happens before the next one (or the end of this stream)."""
        if end.kind is EndKind.TAKEN_OVER:
            raise TakenOver(f"request {request.request_id}: {end.reason}")
        if end.dead_worker:
            self.membership.dead(end.dead_worker, end.reason)
        if number == MAX_MIGRATIONS:
            raise Unavailable(f"request {request.request_id}: {end.reason}; resumed {MAX_MIGRATIONS} times already")
        handed_on = end.kind is EndKind.HANDED_ON
        log.log(logging.INFO if handed_on else logging.WARNING, "request %s: %s; resuming elsewhere after %d tokens",
                request.request_id, end.reason, tokens)
        (self.metrics.hand_ons if handed_on else self.metrics.migrations).inc()
        if not handed_on:
            await asyncio.sleep(MIGRATION_BACKOFF_S * number)

    def _last(self, request: ValidRequest, clock: RequestClock, output: Output, sent: list[int], workers: str,
              piece: Piece | None = None) -> Piece:
        clock.finished = True
        timings = clock.timings()
        self.records.record(request, clock, output.finish_reason, timings, workers)
        tokens, text = (piece.token_ids, piece.text) if piece is not None else ((), "")
        return Piece(tokens, text, output.finish_reason, timings, len(sent), piece.logprobs if piece else (),
                     piece.prompt_logprobs if piece else None)
