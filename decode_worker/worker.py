"""The decode worker (a Ray actor in a cluster; a plain object in unit tests).

Life of a handed-off request here:

    reserve(task)  -> blocks allocated for the prompt                      (before the prefill starts)
    commit(first)  -> the prefill's first token; the KV receive posted     (the prefill worker is sending now)
    KV arrives     -> the connector reports DONE -> decoding, batched with every other running request
    each step      -> a TokenEvent per request, which the router drains with `events`
    finished       -> blocks freed.
    (or hand_on)   -> the worker is leaving its pool: the request ends here with a handed-on event, and the router
                      resumes it on another decode worker.

The receive is posted only once its send has started, so its timeout bounds the transfer itself, never the wait
in a prefill queue (and no transfer thread waits for a KV that is still queued). A receive that fails or times out
frees the blocks and ends the request with an error event. `abort` works at every stage (reserved, receiving,
decoding) and frees the blocks; told that the KV was already on the wire, it posts the receive that drains it.

Colocated (role both): `generate(task)` queues the whole request here; prefill and decode share this engine, which
is the baseline the disaggregated mode is measured against. Everything that touches the engine or the connector
runs on the engine thread; events cross to the asyncio side with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from pdserve.cluster.engine_thread import EngineThread
from pdserve.cluster.messages import DecodeTask, Reservation, TokenEvent
from pdserve.cluster.registry import WorkerInfo
from pdserve.cluster.worker_runtime import WorkerRuntime, WorkerSpec
from pdserve.engine.engine import Engine
from pdserve.engine.request import FinishReason, RequestOutput
from pdserve.engine.step_profile import StepProfile, profile_engine
from pdserve.kv_transfer.connector import KVConnector, Transfer, TransferError, TransferResult, TransferStatus

log = logging.getLogger(__name__)


@dataclass
class _Arrival:
    """A handed-off request from reserve until its KV has landed."""

    task: DecodeTask
    blocks: tuple[int, ...]
    posted: bool = False
    """Its receive is posted (from commit, or to drain an aborted request's KV)."""
    received: TransferResult | None = None
    first_token_id: int | None = None


@dataclass
class _Local:
    """A colocated request until its first token."""

    enqueued: float
    started: float | None = None


class DecodeWorker:
    def __init__(self, spec: WorkerSpec, connector: KVConnector | None = None,
                 thread: EngineThread | None = None) -> None:
        self.runtime = WorkerRuntime(spec, self._after_step, connector, thread)
        self._arriving: dict[str, _Arrival] = {}
        self._local: dict[str, _Local] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: list[TokenEvent] = []
        self._wakeup: asyncio.Event | None = None

    # ---- called by the router (asyncio side) -----------------------------------------------------------------
    async def start(self) -> WorkerInfo:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        return await self.runtime.start()

    async def connect(self, peer: str, store_address: str, rank: int, generation: int = 0) -> None:
        await self.runtime.connect(peer, store_address, rank, generation)

    async def info(self) -> WorkerInfo:
        return self.runtime.info()

    async def reserve(self, task: DecodeTask) -> Reservation | None:
        """Allocate blocks for the request's KV; None when there is no room right now."""
        return await self.runtime.call(lambda engine: self._reserve(engine, task))

    async def commit(self, request_id: str, first_token_id: int) -> None:
        """The prefill is done and its KV is being sent: receive it, then decode from `first_token_id`."""
        await self.runtime.call(lambda engine: self._commit(engine, request_id, first_token_id))

    async def generate(self, task: DecodeTask) -> None:
        """Colocated: prefill and decode the whole request here."""
        await self.runtime.call(lambda engine: self._generate(engine, task))

    async def abort(self, request_id: str, kv_sent: bool = False) -> None:
        """Drop the request here and free its blocks. `kv_sent`: the prefill worker had started sending its KV, so
        a receive must drain it (else the send would wait for one until it timed out, and gloo would close the
        pair)."""
        await self.runtime.call(lambda engine: self._abort(engine, request_id, kv_sent))

    async def events(self, timeout_s: float = 1.0) -> list[TokenEvent]:
        """Every event since the last call; waits up to `timeout_s` for one."""
        if not self._events:
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout_s)
            except TimeoutError:
                return []
        events, self._events = self._events, []
        self._wakeup.clear()
        return events

    async def metrics(self) -> list:
        """This worker's Prometheus metric families (served by the router at /metrics/workers)."""
        return self.runtime.metric_families()

    async def profile(self) -> StepProfile:
        """Time a few synthetic steps on this (idle) engine: the controller's performance model."""
        return await self.runtime.call(profile_engine)

    async def drain(self) -> None:
        """Finish what is here and take nothing new (before a role switch or removal)."""
        self.runtime.drain()

    async def hand_on(self) -> int:
        """Leaving the pool (drained, for a move or a removal): give back every request decoding here. The router
        resumes each on another decode worker (its prompt and tokens so far prefilled again), as after a failure.
        Requests whose KV is still arriving stay, and are handed on by a later call. Returns how many."""
        return await self.runtime.call(self._hand_on)

    async def idle(self) -> bool:
        """No request reserved, arriving, decoding, or with events the router has not collected."""
        quiet = await self.runtime.call(
            lambda engine: not engine.num_requests and not self._arriving and not self._local)
        return quiet and not self._events

    async def stop(self) -> None:
        self.runtime.stop()

    def _deliver(self, events: list[TokenEvent]) -> None:
        self._events.extend(events)
        self._wakeup.set()

    # ---- on the engine thread --------------------------------------------------------------------------------
    def _reserve(self, engine: Engine, task: DecodeTask) -> Reservation | None:
        blocks = engine.reserve_remote(task.request_id, task.token_ids, task.sampling)
        if blocks is None:
            return None
        self._arriving[task.request_id] = _Arrival(task, blocks)
        load = engine.load()
        return Reservation(task.request_id, len(blocks), load.kv_blocks_total - load.kv_blocks_used,
                           load.running + load.held)

    def _commit(self, engine: Engine, request_id: str, first_token_id: int) -> None:
        arrival = self._arriving.get(request_id)
        if arrival is None:
            return  # aborted (the router has its event)
        arrival.first_token_id = first_token_id
        try:
            self._post_receive(arrival)
        except TransferError as e:
            del self._arriving[request_id]
            engine.release(request_id)
            self._emit([TokenEvent(request_id, finish_reason=FinishReason.ABORT, error=f"KV receive: {e}")])

    def _post_receive(self, arrival: _Arrival) -> None:
        task = arrival.task
        self.runtime.connector.start_recv(Transfer(task.request_id, task.prefill_worker, arrival.blocks, task.tag,
                                                   self.runtime.spec.kv_transfer.timeout_s))
        arrival.posted = True

    def _generate(self, engine: Engine, task: DecodeTask) -> None:
        engine.add_request(task.request_id, list(task.token_ids), task.sampling)
        self._local[task.request_id] = _Local(time.monotonic())

    def _abort(self, engine: Engine, request_id: str, kv_sent: bool) -> None:
        self._local.pop(request_id, None)
        arrival = self._arriving.pop(request_id, None)
        if arrival is not None:
            if kv_sent and not arrival.posted:
                self._drain(arrival)
            self.runtime.connector.cancel(request_id)  # afterwards no thread touches the blocks
            engine.release(request_id)
            self._emit([TokenEvent(request_id, finish_reason=FinishReason.ABORT)])
            return
        if engine.abort(request_id) is not None:
            self._emit([TokenEvent(request_id, finish_reason=FinishReason.ABORT)])

    def _hand_on(self, engine: Engine) -> int:
        decoding = [i for i in engine.request_ids if i not in self._arriving and i not in self._local]
        events = [TokenEvent(i, finish_reason=FinishReason.ABORT, handed_on=True) for i in decoding
                  if engine.abort(i) is not None]
        self._emit(events)
        return len(events)

    def _drain(self, arrival: _Arrival) -> None:
        """Receive a KV nobody wants (cancelled at once, it lands in staging only), so the sender's send completes."""
        try:
            self._post_receive(arrival)
        except TransferError as e:  # no pair with that worker any more: its send cannot complete either
            log.warning("KV of aborted %s from %s not drained: %s", arrival.task.request_id,
                        arrival.task.prefill_worker, e)

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
        return TokenEvent(output.request_id, output.new_token_ids, output.text_delta, output.finish_reason,
                          queue_s=queue_s, prefill_s=prefill_s)

    def _received(self, engine: Engine, result: TransferResult) -> list[TokenEvent]:
        arrival = self._arriving.get(result.transfer_id)
        if arrival is None:
            return []  # aborted; its blocks were freed then
        arrival.received = result
        if result.status is not TransferStatus.DONE:
            del self._arriving[result.transfer_id]
            engine.release(result.transfer_id)
            return [TokenEvent(result.transfer_id, finish_reason=FinishReason.ABORT,
                               error=f"KV transfer {result.status.value}: {result.error}")]
        return self._start_decoding(engine, result.transfer_id)

    def _start_decoding(self, engine: Engine, request_id: str) -> list[TokenEvent]:
        arrival = self._arriving.pop(request_id)
        output = engine.commit_remote(request_id, arrival.first_token_id)
        # The first token's text went to the client with the prefill's reply; only the end (if any) is new.
        return [TokenEvent(request_id, finish_reason=output.finish_reason, kv_transfer_s=arrival.received.seconds)]

    def _emit(self, events: list[TokenEvent]) -> None:
        if events:
            self._loop.call_soon_threadsafe(self._deliver, events)
