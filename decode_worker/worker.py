"""The decode worker (a Ray actor in a cluster; a plain object in unit tests).

Life of a handed-off request here:

    reserve(task)   -> blocks allocated for the prompt and a transfer tag chosen; the task's router owns the request;
                       a prefix of the prompt found in this worker's prefix cache is shared, and only the blocks
                       after it are to be received (`Reservation.cached_blocks`)
    announce(kv)    -> from the prefill worker, as its send starts: the KV receive posted (first token with it;
                       streamed layer by layer, the token comes after, in `first_token`; either may come first)
    KV arrives      -> the connector reports DONE -> decoding, batched with every other running request
    each step       -> a TokenEvent per request, into its journal and its router's outbox (`owners`)
    events(router)  -> the router collects its outbox, which renews its lease on its requests here
    finished        -> blocks freed; the journal goes once the router says it is done with the request
    (or hand_on)    -> the worker is leaving its pool: the request ends here with a handed-on event, and the router
                       resumes it on another decode worker
    (or adopt)      -> its client reconnected to another router, which owns it from then on
    (or reaped)     -> its router stopped collecting for `lease_s`: aborted, blocks freed

The receive is posted only once its send has started, so its timeout bounds the transfer itself, never the wait
in a prefill queue. A receive that fails or times out frees the blocks and ends the request with an error event.
`abort` works at every stage (reserved, receiving, decoding) and frees the blocks (a receiving one's once the
connector reports its receive, whose KV may be landing in them); one that Ray ran before the
reserve it cancels is remembered, and that reserve is refused (`worker.aborted`); KV announced for a request that
is no longer here (aborted, reaped) is received and dropped, so the sender's send completes and the pair stays in
step.

Colocated (role both): `generate(task)` queues the whole request here; prefill and decode share this engine, which
is the baseline the disaggregated mode is measured against. Everything that touches the engine or the connector
runs on the engine thread; events cross to the asyncio side with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pdserve.decode_worker.owners import Owners
from pdserve.engine.engine import Engine
from pdserve.engine.logprobs import TokenLogprobs
from pdserve.engine.request import FinishReason, RequestOutput
from pdserve.engine.step_profile import StepProfile, profile_engine
from pdserve.kv_transfer.connector import KVConnector, Transfer, TransferError, TransferResult, TransferStatus
from pdserve.registry.entries import WorkerInfo
from pdserve.worker.aborted import AbortedRequests
from pdserve.worker.engine_thread import EngineThread
from pdserve.worker.messages import Adoption, DecodeTask, FirstToken, KVAnnouncement, Reservation, TokenEvent
from pdserve.worker.runtime import WorkerRuntime, WorkerSpec

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 1.0
TAG_LIMIT = 1 << 31


@dataclass
class _Arrival:
    """A handed-off request from reserve until its KV has landed."""

    task: DecodeTask
    blocks: tuple[int, ...]
    """The reserved blocks the KV is received into (after those of a cached prefix)."""
    tag: int
    posted: bool = False
    """Its receive is posted (the prefill worker announced the send)."""
    received: TransferResult | None = None
    first_token_id: int | None = None
    first_logprobs: TokenLogprobs | None = None


@dataclass
class _Local:
    """A colocated request until its first token."""

    enqueued: float
    started: float | None = None


class DecodeWorker:
    def __init__(self, spec: WorkerSpec, connector: KVConnector | None = None,
                 thread: EngineThread | None = None) -> None:
        self.runtime = WorkerRuntime(spec, self._after_step, connector, thread)
        self.owners = Owners(spec.lease_s)
        self._arriving: dict[str, _Arrival] = {}
        self._local: dict[str, _Local] = {}
        self._cancelling: set[str] = set()
        """Aborted requests whose posted receive may still be writing into their blocks: freed when it is reported."""
        self._aborted = AbortedRequests()
        self._tags = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper: asyncio.Task | None = None

    # ---- called by routers and prefill workers (asyncio side) ------------------------------------------------
    async def start(self) -> WorkerInfo:
        self._loop = asyncio.get_running_loop()
        info = await self.runtime.start()
        self._reaper = asyncio.create_task(self._reap(), name=f"reap-{self.runtime.spec.worker_id}")
        return info

    async def connect(self, peer: str, store_address: str, rank: int, generation: int = 0) -> None:
        await self.runtime.connect(peer, store_address, rank, generation)

    async def info(self) -> WorkerInfo:
        return self.runtime.info()

    async def reserve(self, task: DecodeTask) -> Reservation | None:
        """Allocate blocks for the request's KV and choose its transfer tag; None when there is no room now, or when
        its router aborted it already (its abort ran first: `worker.aborted`)."""
        if task.request_id in self._aborted:
            return None
        self.owners.add(task.request_id, task.owner, task.prefill_worker)  # before any event of it can exist
        tag = next(self._tags) % TAG_LIMIT
        reservation = await self.runtime.call(lambda engine: self._reserve(engine, task, tag))
        if reservation is None:
            self.owners.forget(task.request_id)
        return reservation

    async def announce(self, announcement: KVAnnouncement) -> None:
        """From the prefill worker: its send of the request's KV has started; receive it."""
        await self.runtime.call(lambda engine: self._announced(engine, announcement))

    async def first_token(self, token: FirstToken) -> None:
        """From the prefill worker, after it announced a streamed send: the first token its step sampled."""
        await self.runtime.call(lambda engine: self._first_token_came(engine, token))

    async def generate(self, task: DecodeTask) -> None:
        """Colocated: prefill and decode the whole request here (unless its router aborted it already)."""
        if task.request_id in self._aborted:
            return
        self.owners.add(task.request_id, task.owner)
        await self.runtime.call(lambda engine: self._generate(engine, task))

    async def abort(self, request_id: str, router_id: str) -> None:
        """Drop the request here and free its blocks, if `router_id` still owns it (a request another router has
        adopted is not its to abort)."""
        owner = self.owners.owner(request_id)
        if owner is not None and owner.router_id != router_id:
            return
        self._aborted.add(request_id)  # before any await: a reserve run after this refuses it
        self.owners.forget(request_id)
        await self.runtime.call(lambda engine: self._abort(engine, request_id))

    async def events(self, router_id: str, timeout_s: float = 1.0, done: Iterable[str] = ()) -> list[TokenEvent]:
        """The router's events since its last call (waits up to `timeout_s` for one); renews its lease here.
        `done`: its requests it wants nothing more of."""
        return await self.owners.take(router_id, timeout_s, done)

    async def adopt(self, client_request_id: str, router_id: str, client_has: int,
                    prompt_digest: str) -> Adoption | None:
        """Hand the request its client knows as `client_request_id` (with a prompt of that digest) to `router_id`
        (its client reconnected there holding `client_has` tokens); None if no request here can go on from there."""
        return self.owners.adopt(client_request_id, router_id, client_has, prompt_digest)

    async def metrics(self) -> list:
        """This worker's Prometheus metric families (served by the router at /metrics/workers)."""
        return self.runtime.metric_families()

    async def profile(self) -> StepProfile:
        """Time a few synthetic steps on this (idle) engine: the controller's performance model."""
        return await self.runtime.call(profile_engine)

    async def drain(self) -> None:
        """Finish what is here and take nothing new (before a role switch or removal)."""
        await self.runtime.drain()

    async def hand_on(self) -> int:
        """Leaving the pool (drained, for a move or a removal): give back every request decoding here. Its router
        resumes each on another decode worker (its prompt and tokens so far prefilled again), as after a failure.
        Requests whose KV is still arriving stay, and are handed on by a later call. Returns how many."""
        return await self.runtime.call(self._hand_on)

    async def idle(self) -> bool:
        """No request reserved, arriving, decoding, or with events its router has not collected."""
        quiet = await self.runtime.call(
            lambda engine: not engine.num_requests and not self._arriving and not self._local
            and not self._cancelling)
        return quiet and not self.owners.undelivered()

    async def stop(self) -> None:
        self._stop_reaping()
        self.runtime.stop()

    async def leave(self) -> EngineThread:
        """Leave the cluster under this identity for a role switch in place (see `WorkerRuntime.leave`)."""
        self._stop_reaping()
        return await self.runtime.leave()

    def _stop_reaping(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()

    async def _reap(self) -> None:
        """Abort the requests of routers whose lease lapsed (killed, hung, cut off), so no block stays held."""
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            for request_id in self.owners.expired():  # finished ones only lose their journal
                try:
                    aborted = await self.runtime.call(lambda engine, r=request_id: self._abort(engine, r))
                except RuntimeError as e:  # the engine thread died; the worker is replaced
                    log.error("reaping %s failed: %s", request_id, e)
                    return
                self.runtime.metrics.reaped += int(aborted)

    def _deliver(self, events: list[TokenEvent]) -> None:
        self.owners.record(events)

    # ---- on the engine thread --------------------------------------------------------------------------------
    def _reserve(self, engine: Engine, task: DecodeTask, tag: int) -> Reservation | None:
        blocks = engine.reserve_remote(task.request_id, task.token_ids, task.sampling, task.resumed_tokens,
                                       task.priority)
        if blocks is None:
            return None
        cached = engine.cached_tokens(task.request_id) // engine.config.block_size
        self._arriving[task.request_id] = _Arrival(task, blocks[cached:], tag)
        load = engine.load()
        return Reservation(task.request_id, tag, len(blocks), load.kv_blocks_total - load.kv_blocks_used,
                           load.running + load.held, cached)

    def _announced(self, engine: Engine, announcement: KVAnnouncement) -> None:
        arrival = self._arriving.get(announcement.request_id)
        if arrival is None or arrival.tag != announcement.tag or arrival.posted:
            self._discard(announcement)
            return
        if announcement.first_token_id is not None:  # streamed: a FirstToken brings it (it may have already)
            arrival.first_token_id = announcement.first_token_id
            arrival.first_logprobs = announcement.first_logprobs
        try:
            self._post_receive(arrival)
        except TransferError as e:  # no pair with that worker any more: its send cannot complete either
            del self._arriving[announcement.request_id]
            engine.release(announcement.request_id)
            self._emit([TokenEvent(announcement.request_id, finish_reason=FinishReason.ABORT,
                                   error=f"KV receive: {e}")])

    def _first_token_came(self, engine: Engine, token: FirstToken) -> None:
        arrival = self._arriving.get(token.request_id)
        if arrival is None or arrival.tag != token.tag:
            return  # aborted here already; its KV, if announced, is discarded
        if token.finished:  # it ended at its first token, at the prefill worker: its router has the answer
            self._abort(engine, token.request_id)
            return
        arrival.first_token_id, arrival.first_logprobs = token.first_token_id, token.first_logprobs
        if arrival.received is not None and arrival.received.status is TransferStatus.DONE:
            self._emit([self._start_decoding(engine, token.request_id)])

    def _post_receive(self, arrival: _Arrival) -> None:
        task = arrival.task
        self.runtime.connector.start_recv(Transfer(task.request_id, task.prefill_worker, arrival.blocks, arrival.tag,
                                                   self.runtime.spec.kv_transfer.timeout_s))
        arrival.posted = True

    def _discard(self, announcement: KVAnnouncement) -> None:
        """Throw away KV nobody here wants without writing a block, so its send completes."""
        try:
            self.runtime.connector.discard(announcement.prefill_worker, announcement.tag)
        except TransferError as e:  # no pair with that worker any more: its send cannot complete either
            log.warning("KV of %s from %s not discarded: %s", announcement.request_id, announcement.prefill_worker, e)

    def _generate(self, engine: Engine, task: DecodeTask) -> None:
        engine.add_request(task.request_id, list(task.token_ids), task.sampling, resumed_tokens=task.resumed_tokens,
                           priority=task.priority)
        self._local[task.request_id] = _Local(time.monotonic())

    def _abort(self, engine: Engine, request_id: str) -> bool:
        """True if the request was here (reserved, arriving or running) and is gone now, its blocks freed (or freed
        once the receive under way into them is reported: `_cancelling`)."""
        if request_id in self._cancelling:
            return True  # aborted already; its blocks go when its receive stops writing them
        self._local.pop(request_id, None)
        arrival = self._arriving.pop(request_id, None)
        if arrival is not None:
            if arrival.posted and arrival.received is None:  # its KV may be landing in its blocks: freed when the
                # connector reports the receive (a streamed one whose KV is here waits only for its first token)
                self._cancelling.add(request_id)
                self.runtime.connector.cancel(request_id)
            else:
                engine.release(request_id)
            return True
        return engine.abort(request_id) is not None

    def _hand_on(self, engine: Engine) -> int:
        decoding = [i for i in engine.request_ids
                    if i not in self._arriving and i not in self._local and i not in self._cancelling]
        events = [TokenEvent(i, finish_reason=FinishReason.ABORT, handed_on=True) for i in decoding
                  if engine.abort(i) is not None]
        self._emit(events)
        return len(events)

    def _after_step(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        events = [self._token_event(output, now) for output in outputs]
        for request_id, local in self._local.items():
            if local.started is None and engine.computed_tokens(request_id):
                local.started = self.runtime.thread.step_started  # its first chunk ran in this step
        for result in self.runtime.connector.poll():
            self.runtime.metrics.transfer(result)
            events.extend(self._received(engine, result))
        self._emit(events)

    def _token_event(self, output: RequestOutput, now: float) -> TokenEvent:
        local = self._local.pop(output.request_id, None)
        queue_s = prefill_s = None
        if local is not None:  # a colocated request's first token
            started = local.started or self.runtime.thread.step_started  # one chunk: it started in this step
            queue_s, prefill_s = started - local.enqueued, now - started
        return TokenEvent(output.request_id, len(output.token_ids) - len(output.new_token_ids), output.new_token_ids,
                          output.text_delta, output.finish_reason, queue_s=queue_s, prefill_s=prefill_s,
                          cached_tokens=output.num_cached_tokens if local is not None else 0,
                          logprobs=output.logprobs, prompt_logprobs=output.prompt_logprobs,
                          speculative_proposed=output.speculative_proposed,
                          speculative_accepted=output.speculative_accepted)

    def _received(self, engine: Engine, result: TransferResult) -> list[TokenEvent]:
        arrival = self._arriving.get(result.transfer_id)
        if arrival is None:  # aborted (its blocks are free now) or discarded (it had none)
            if result.transfer_id in self._cancelling:
                self._cancelling.discard(result.transfer_id)
                if result.transfer_id in engine.request_ids:  # (a stop may have freed everything meanwhile)
                    engine.release(result.transfer_id)
            return []
        arrival.received = result
        if result.status is not TransferStatus.DONE:
            del self._arriving[result.transfer_id]
            engine.release(result.transfer_id)
            return [TokenEvent(result.transfer_id, finish_reason=FinishReason.ABORT,
                               error=f"KV transfer {result.status.value}: {result.error}")]
        if arrival.first_token_id is None:
            return []  # streamed: its KV is here, its first token not yet (`first_token`)
        return [self._start_decoding(engine, result.transfer_id)]

    def _start_decoding(self, engine: Engine, request_id: str) -> TokenEvent:
        """The first token (the prefill worker sampled it; its router may have sent it on already) starts the
        request's journal here, so a router that takes the request over later can send it too."""
        arrival = self._arriving.pop(request_id)
        output = engine.commit_remote(request_id, arrival.first_token_id)
        logprobs = (arrival.first_logprobs,) if arrival.first_logprobs is not None else ()
        return TokenEvent(request_id, 0, output.new_token_ids, output.text_delta, output.finish_reason,
                          kv_transfer_s=arrival.received.seconds, logprobs=logprobs)

    def _emit(self, events: list[TokenEvent]) -> None:
        if events:
            self._loop.call_soon_threadsafe(self._deliver, events)
