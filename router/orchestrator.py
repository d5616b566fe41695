"""The life of a request across the workers, as the router drives it.

Disaggregated:

    pick a decode worker D (most free blocks) and a prefill worker P paired with it (fewest queued tokens)
    -> D.reserve: blocks allocated (no room anywhere: wait and pick again)
    -> P.prefill: queued, prefilled (batched with other prompts), first token sampled; P starts pushing the KV to D
    -> the first token goes to the client now; D.commit(first token) posts the KV receive
    -> D decodes once the KV has landed; its TokenEvents (drained by `Membership`) stream to the client.

Colocated: pick a worker W (most free blocks) -> W.generate -> its TokenEvents stream to the client.

Whatever ends the stream early (the client cancels or disconnects, a worker fails) lands in one `finally` that
aborts the request on every worker it was sent to (the prefill worker first: if its KV is already on the wire, the
decode worker drains it), so blocks are freed on both sides. Every finished request appends
its timings to the registry's stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
import redis

from pdserve.cluster.messages import DecodeTask, PrefillTask, TokenEvent
from pdserve.cluster.registry import Registry, Role
from pdserve.controller.output_lengths import NUM_CLASSES, prompt_class
from pdserve.engine.block_manager import blocks_for
from pdserve.engine.request import FinishReason
from pdserve.router.membership import Member, Membership
from pdserve.router.metrics import RouterMetrics
from pdserve.router.migration import MAX_MIGRATIONS, continuation
from pdserve.router.policy import pick_decode, pick_prefill
from pdserve.router.request_builder import InvalidRequest, ValidRequest
from pdserve.router.timings import RequestClock, Timings

log = logging.getLogger(__name__)

ROOM_RETRY_S = 0.5
"""A request waiting for KV room tries again when another request ends, or after this long (a heartbeat)."""
NO_WORKERS_WAIT_S = 10.0
CHOOSE_RETRY_S = 0.1
MIGRATION_BACKOFF_S = 1.0
"""Before resuming a request for the n-th time, wait n - 1 times this (a failure that repeats at once has a cause
that a moment may clear: a heartbeat still to expire, a broken KV pair to be formed again)."""


class Unavailable(RuntimeError):
    """No worker can take the request, or the one serving it failed."""


class WorkerFailed(Unavailable):
    """A worker serving the request failed (its actor died, its KV never arrived): the request can go on elsewhere."""

    def __init__(self, message: str, dead: str = "") -> None:
        super().__init__(message)
        self.dead = dead
        """The worker whose actor died, if that is what happened."""


class HandedOn(WorkerFailed):
    """The decode worker is leaving its pool (a move or a removal) and gave the request back: resumed at once."""


class WorkerError(RuntimeError):
    """A worker raised while serving the request (a bug, not a failure of the worker): INTERNAL, not resumed."""


class DuplicateRequest(ValueError):
    pass


class Overloaded(RuntimeError):
    """The admission queue is full: the request is refused at once (RESOURCE_EXHAUSTED), not failed later."""


@dataclass(frozen=True)
class Piece:
    """What the client gets next: new tokens and text; the last piece has the finish reason and timings."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    timings: Timings | None = None
    completion_tokens: int = 0
    """On the last piece: every token sent."""


@dataclass
class _Route:
    """The workers a request was sent to (set before each call, so an abort reaches every one that may know it)."""

    decode: Member | None = None
    """The decode worker, or the colocated worker."""
    prefill: Member | None = None
    tag: int = 0

    @property
    def worker_ids(self) -> str:
        return ",".join(m.info.worker_id for m in (self.decode, self.prefill) if m is not None)


@dataclass
class _Stream:
    worker_id: str
    events: asyncio.Queue


class Orchestrator:
    def __init__(self, registry: Registry, namespace: str, colocated: bool, block_size: int,
                 max_waiting: int = 1024) -> None:
        """`max_waiting`: the admission queue's bound, requests accepted and not yet given a worker."""
        self.registry = registry
        self.colocated = colocated
        self.block_size = block_size
        self.membership = Membership(registry, namespace, self._on_events, self._on_lost)
        self.max_waiting = max_waiting
        self._room = asyncio.Event()
        """Set (and replaced) when a request ends: blocks may have been freed, so waiters try again."""
        self._requests: set[str] = set()
        """The client request ids in flight (a duplicate is refused)."""
        self._streams: dict[str, _Stream] = {}
        """Per attempt, by the id the workers know it by (the client's id, then `<id>@retry<n>` after a failure)."""
        self._tags = itertools.count(1)
        self._prefill_tokens: dict[str, int] = defaultdict(int)
        self.metrics = RouterMetrics(in_flight=lambda: self.in_flight_count)
        self.accepted_total = 0
        """Requests accepted since the router started (the controller's arrival rate)."""
        self.accepted_prompt_tokens = 0
        """Their prompt tokens (the controller's arriving prompt length)."""
        self.accepted_by_class = [0] * NUM_CLASSES
        """Their count per prompt-length class (the controller's predicted output length)."""

    async def generate(self, request: ValidRequest) -> AsyncIterator[Piece]:
        if request.request_id in self._requests:
            raise DuplicateRequest(f"request_id: {request.request_id!r} is already running")
        if self.waiting_count >= self.max_waiting:
            raise Overloaded(f"overloaded: {self.waiting_count} requests are already waiting for a worker "
                             f"(router.max_waiting); retry later")
        clock = RequestClock()
        self._requests.add(request.request_id)
        self.accepted_total += 1
        self.accepted_prompt_tokens += len(request.token_ids)
        self.accepted_by_class[prompt_class(len(request.token_ids))] += 1
        sent: list[int] = []
        attempt = route = None
        finished = False
        try:
            for number in range(MAX_MIGRATIONS + 1):
                attempt = continuation(request, sent, number)
                if attempt is None:  # every token was sent before the worker failed; only the end was lost
                    finished = True
                    yield self._last(request, clock, Piece((), "", FinishReason.LENGTH), route)
                    return
                route = _Route()
                self._streams[attempt.request_id] = _Stream("", asyncio.Queue())
                try:
                    stages = clock if number == 0 else RequestClock()  # the timings describe the first attempt
                    async for piece in self._pieces(attempt, stages, self._streams[attempt.request_id], route):
                        sent.extend(piece.token_ids)
                        gap = clock.tokens_sent(len(piece.token_ids))
                        if gap is not None:
                            self.metrics.inter_token.observe(gap)
                        if piece.finish_reason is not None:
                            finished = True
                            yield self._last(request, clock, piece, route)
                            return
                        yield piece
                except WorkerFailed as e:
                    if e.dead:
                        self.membership.dead(e.dead, str(e))
                    if number == MAX_MIGRATIONS:
                        raise
                    handed_on = isinstance(e, HandedOn)
                    log.log(logging.INFO if handed_on else logging.WARNING,
                            "request %s: %s; resuming elsewhere after %d tokens", request.request_id, e, len(sent))
                    (self.metrics.hand_ons if handed_on else self.metrics.migrations).inc()
                    await asyncio.shield(self._abort(attempt.request_id, route))
                    if not handed_on:
                        await asyncio.sleep(MIGRATION_BACKOFF_S * number)
                finally:
                    del self._streams[attempt.request_id]
        except BaseException as e:
            if not finished:
                self.metrics.failed(e)
            raise
        finally:
            self._requests.discard(request.request_id)
            if not finished and attempt is not None and route is not None:
                await asyncio.shield(self._abort(attempt.request_id, route))
            self._room_freed()

    def _room_freed(self) -> None:
        self._room.set()
        self._room = asyncio.Event()

    async def _wait_for_room(self) -> None:
        """Until a request ends somewhere (or a heartbeat may show room: ROOM_RETRY_S at most)."""
        try:
            await asyncio.wait_for(self._room.wait(), ROOM_RETRY_S)
        except TimeoutError:
            pass

    def _last(self, request: ValidRequest, clock: RequestClock, piece: Piece, route: _Route | None) -> Piece:
        timings = clock.timings()
        self._record(request, clock, piece.finish_reason, timings, route or _Route())
        return Piece(piece.token_ids, piece.text, piece.finish_reason, timings, clock.tokens)

    def _pieces(self, request: ValidRequest, clock: RequestClock, stream: _Stream,
                route: _Route) -> AsyncIterator[Piece]:
        if self.colocated:
            return self._colocated(request, clock, stream, route)
        return self._disaggregated(request, clock, stream, route)

    @property
    def in_flight_count(self) -> int:
        """Requests accepted and not yet ended."""
        return len(self._streams)

    @property
    def waiting_count(self) -> int:
        """Requests accepted and not yet given a worker."""
        return sum(1 for stream in self._streams.values() if not stream.worker_id)

    # ---- the two modes ---------------------------------------------------------------------------------------
    async def _disaggregated(self, request: ValidRequest, clock: RequestClock, stream: _Stream,
                             route: _Route) -> AsyncIterator[Piece]:
        route.tag = next(self._tags) % (1 << 31)
        with self.metrics.waiting.track_inprogress():
            decode, prefill = await self._reserve(request, route, stream)
        clock.dispatched = time.monotonic()
        result = await self._prefill(prefill, PrefillTask(request.request_id, request.token_ids, request.sampling,
                                                          decode.info.worker_id, route.tag))
        clock.worker_queue_s, clock.prefill_s = result.queue_s, result.prefill_s
        if result.first_token_id is None:
            raise WorkerFailed(f"prefill worker {prefill.info.worker_id} dropped the request")
        if result.finish_reason is not None:  # the first token ended it; no KV was sent
            await _call(decode, decode.handle.abort.remote(request.request_id, kv_sent=False))
            yield Piece((result.first_token_id,), result.text_delta, result.finish_reason)
            return
        yield Piece((result.first_token_id,), result.text_delta)
        await _call(decode, decode.handle.commit.remote(request.request_id, result.first_token_id))
        async for piece in self._events(stream, clock):
            yield piece

    async def _colocated(self, request: ValidRequest, clock: RequestClock, stream: _Stream,
                         route: _Route) -> AsyncIterator[Piece]:
        with self.metrics.waiting.track_inprogress():
            worker = await self._choose(lambda: self._check_fits(request, pick_decode(
                [m.info for m in self.membership.ready(Role.BOTH)])))
        stream.worker_id = worker.info.worker_id
        route.decode = worker
        clock.dispatched = time.monotonic()
        await _call(worker, worker.handle.generate.remote(DecodeTask(request.request_id, request.token_ids,
                                                                     request.sampling)))
        async for piece in self._events(stream, clock):
            yield piece

    # ---- steps -----------------------------------------------------------------------------------------------
    async def _reserve(self, request: ValidRequest, route: _Route, stream: _Stream) -> tuple[Member, Member]:
        """A decode worker with room and a prefill worker paired with it; waits while every decode worker is full."""
        while True:
            decode = await self._choose(lambda: self._check_fits(request, pick_decode(
                [m.info for m in self.membership.ready(Role.DECODE) if self.membership.prefill_for(m.info.worker_id)])))
            prefill_info = pick_prefill([m.info for m in self.membership.prefill_for(decode.info.worker_id)],
                                        self._prefill_tokens)
            prefill = self.membership.members.get(prefill_info.worker_id) if prefill_info else None
            if prefill is None:
                continue
            stream.worker_id = decode.info.worker_id
            route.decode, route.prefill = decode, prefill
            task = DecodeTask(request.request_id, request.token_ids, request.sampling, prefill.info.worker_id,
                              route.tag)
            reservation = await _call(decode, decode.handle.reserve.remote(task))
            if reservation is not None:
                self.membership.update(decode.info.worker_id, kv_blocks_used=decode.info.kv_blocks_total
                                       - reservation.kv_blocks_free, running=reservation.running)
                return decode, prefill
            self.membership.update(decode.info.worker_id, kv_blocks_used=decode.info.kv_blocks_total)  # full
            await self._wait_for_room()

    async def _choose(self, pick) -> Member:
        """The member `pick` names; waits a while for one to join when there is none."""
        deadline = asyncio.get_running_loop().time() + NO_WORKERS_WAIT_S
        while True:
            info = pick()
            if info is not None and info.worker_id in self.membership.members:
                return self.membership.members[info.worker_id]
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable("no ready worker for this request (see `pdserve status`)")
            await asyncio.sleep(CHOOSE_RETRY_S)

    def _check_fits(self, request: ValidRequest, info):
        if info is not None and blocks_for(len(request.token_ids) + request.sampling.max_tokens,
                                           self.block_size) > info.kv_blocks_total:
            raise InvalidRequest(f"sampling.max_tokens: prompt + max_tokens needs more KV blocks than a worker has "
                                 f"({info.kv_blocks_total} of {self.block_size} tokens)")
        return info

    async def _prefill(self, prefill: Member, task: PrefillTask):
        worker_id = prefill.info.worker_id
        self._prefill_tokens[worker_id] += len(task.token_ids)
        try:
            return await _call(prefill, prefill.handle.prefill.remote(task))
        finally:
            self._prefill_tokens[worker_id] -= len(task.token_ids)

    async def _events(self, stream: _Stream, clock: RequestClock) -> AsyncIterator[Piece]:
        while True:
            event: TokenEvent = await stream.events.get()
            if event.handed_on:
                raise HandedOn(f"worker {stream.worker_id} is leaving its pool and handed the request on")
            if event.error:
                raise WorkerFailed(f"worker {stream.worker_id}: {event.error}")
            if event.kv_transfer_s is not None and clock.first_token is not None:
                clock.kv_transfer_s = time.monotonic() - clock.first_token  # prefill done -> decoding, seen here
            if event.queue_s is not None:
                clock.worker_queue_s, clock.prefill_s = event.queue_s, event.prefill_s or 0.0
            if event.token_ids or event.finish_reason is not None:
                yield Piece(event.token_ids, event.text_delta, event.finish_reason)
            if event.finish_reason is not None:
                return

    async def _abort(self, request_id: str, route: _Route) -> None:
        """Prefill first: it says whether the KV is already on the wire, which the decode worker must then drain."""
        kv_sent = False
        if route.prefill is not None:
            try:
                kv_sent = bool(await route.prefill.handle.abort.remote(request_id, tag=route.tag))
            except ray.exceptions.RayError as e:  # a dead sender's send ends with it
                log.warning("abort of %s on %s failed: %s", request_id, route.prefill.info.worker_id, e)
        if route.decode is not None:
            try:
                await route.decode.handle.abort.remote(request_id, kv_sent=kv_sent)
            except ray.exceptions.RayError as e:
                log.warning("abort of %s on %s failed: %s", request_id, route.decode.info.worker_id, e)

    # ---- callbacks from Membership ---------------------------------------------------------------------------
    def _on_events(self, events: list[TokenEvent]) -> None:
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is not None:
                stream.events.put_nowait(event)

    def _on_lost(self, worker_id: str, reason: str) -> None:
        for request_id, stream in self._streams.items():
            if stream.worker_id == worker_id:
                stream.events.put_nowait(TokenEvent(request_id, finish_reason=FinishReason.ABORT,
                                                    error=f"worker lost ({reason})"))

    def _record(self, request: ValidRequest, clock: RequestClock, finish: FinishReason, timings: Timings,
                route: _Route) -> None:
        fields = {"request_id": request.request_id, "prompt_tokens": len(request.token_ids),
                  "completion_tokens": clock.tokens, "finish_reason": finish.value,
                  "workers": route.worker_ids, **timings.as_fields()}
        self.metrics.finished(timings, finish.value, len(request.token_ids), clock.tokens)
        try:
            self.registry.append_timings(fields)
        except redis.RedisError as e:
            log.warning("timings of %s not recorded: %s", request.request_id, e)


async def _call(member: Member, ref):
    try:
        return await ref
    except ray.exceptions.RayActorError as e:
        raise WorkerFailed(f"worker {member.info.worker_id} failed: {type(e).__name__}",
                           dead=member.info.worker_id) from e
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if e.cause is not None else e
        log.error("worker %s raised: %r", member.info.worker_id, cause)
        raise WorkerError(f"worker {member.info.worker_id}: {type(cause).__name__}: {cause}") from e
