"""The prefill worker (a Ray actor in a cluster; a plain object in unit tests).

Life of a request here:

    prefill(task) -> the engine's queue (prefill-only; batched with other prompts, chunked when long)
      -> first token sampled, blocks held -> start_send(blocks -> the decode worker's reserved blocks)
      -> the first token goes back to the router at once, while the KV is on the wire
      -> the send's outcome (done, failed, cancelled, timed out) -> blocks released.

The decode worker posts its receive when the router hands it the first token (or, for an aborted request, when the
abort finds the KV already on the wire), so the send waits for it only that long. If the first token already ends
the request (EOS, a stop, max_tokens 1) nothing is sent and its blocks are freed at once. `abort` works at every
stage: a queued or running prefill is dropped; a send already on the wire finishes and then frees the blocks, and
`abort` says so, so that the router has the decode worker drain it (see kv_transfer.connector).
Everything that touches the engine or the connector runs on the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

from pdserve.cluster.engine_thread import EngineThread
from pdserve.cluster.messages import PrefillResult, PrefillTask
from pdserve.cluster.registry import WorkerInfo
from pdserve.cluster.worker_runtime import WorkerRuntime, WorkerSpec
from pdserve.engine.engine import Engine
from pdserve.engine.request import FinishReason, RequestOutput
from pdserve.engine.step_profile import StepProfile, profile_engine
from pdserve.kv_transfer.connector import KVConnector, Transfer, TransferError

log = logging.getLogger(__name__)

SENT_MEMORY = 65536


@dataclass
class _Prefill:
    task: PrefillTask
    result: Future
    enqueued: float
    started: float | None = None


class PrefillWorker:
    def __init__(self, spec: WorkerSpec, connector: KVConnector | None = None,
                 thread: EngineThread | None = None) -> None:
        self.runtime = WorkerRuntime(spec, self._after_step, connector, thread)
        self._prefilling: dict[str, _Prefill] = {}
        self._sending: set[str] = set()
        self._sent: OrderedDict[tuple[str, int], None] = OrderedDict()
        """(request id, tag) of the requests whose KV send has started, newest last (what `abort` answers; the tag
        tells a client's reused request id from its earlier life)."""

    # ---- called by the router (asyncio side) -----------------------------------------------------------------
    async def start(self) -> WorkerInfo:
        return await self.runtime.start()

    async def connect(self, peer: str, store_address: str, rank: int, generation: int = 0) -> None:
        await self.runtime.connect(peer, store_address, rank, generation)

    async def info(self) -> WorkerInfo:
        return self.runtime.info()

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        result: Future = Future()
        await self.runtime.call(lambda engine: self._add(engine, task, result))
        return await asyncio.wrap_future(result)

    async def abort(self, request_id: str, tag: int) -> bool:
        """Drop the request here. True when its KV send (under `tag`) had already started: the decode worker must
        then post the receive that drains it (a send on the wire cannot be recalled)."""
        return await self.runtime.call(lambda engine: self._abort(engine, request_id, tag))

    async def metrics(self) -> list:
        """This worker's Prometheus metric families (served by the router at /metrics/workers)."""
        return self.runtime.metric_families()

    async def profile(self) -> StepProfile:
        """Time a few synthetic steps on this (idle) engine: the controller's performance model."""
        return await self.runtime.call(profile_engine)

    async def drain(self) -> None:
        """Finish what is here and take nothing new (before a role switch or removal)."""
        self.runtime.drain()

    async def idle(self) -> bool:
        """Nothing queued, prefilling or being sent."""
        return await self.runtime.call(
            lambda engine: not engine.num_requests and not self._prefilling and not self._sending)

    async def stop(self) -> None:
        self.runtime.stop()

    # ---- on the engine thread --------------------------------------------------------------------------------
    def _add(self, engine: Engine, task: PrefillTask, result: Future) -> None:
        engine.add_request(task.request_id, list(task.token_ids), task.sampling, prefill_only=True)
        self._prefilling[task.request_id] = _Prefill(task, result, time.monotonic())

    def _after_step(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            self._first_token(engine, output, now)
        for p in self._prefilling.values():
            if p.started is None and engine.computed_tokens(p.task.request_id):
                p.started = self.runtime.thread.step_started  # its first chunk ran in this step
        for result in self.runtime.connector.poll():
            self.runtime.metrics.transfer(result)
            self._sending.discard(result.transfer_id)
            engine.release(result.transfer_id)  # on every outcome; the decode side frees its own

    def _first_token(self, engine: Engine, output: RequestOutput, now: float) -> None:
        p = self._prefilling.pop(output.request_id, None)
        if p is None:
            return
        started = p.started or self.runtime.thread.step_started  # one chunk: it started in this step
        handed_off = output.finish_reason is FinishReason.PREFILLED
        if handed_off:
            try:
                self._send(output.request_id, p.task, engine.held_block_ids(output.request_id))
            except TransferError as e:  # no working pair with that decode worker (it broke): the router retries
                log.warning("KV of %s cannot go to %s: %s", output.request_id, p.task.decode_worker, e)
                engine.release(output.request_id)
                p.result.set_result(PrefillResult(output.request_id, None, "", FinishReason.ABORT, 0.0, 0.0))
                return
        p.result.set_result(PrefillResult(
            output.request_id, output.new_token_ids[0], output.text_delta,
            None if handed_off else output.finish_reason, started - p.enqueued, now - started))

    def _abort(self, engine: Engine, request_id: str, tag: int) -> bool:
        p = self._prefilling.pop(request_id, None)
        if p is not None:
            engine.abort(request_id)
            p.result.set_result(PrefillResult(request_id, None, "", FinishReason.ABORT, 0.0, 0.0))
        return (request_id, tag) in self._sent

    def _send(self, request_id: str, task: PrefillTask, blocks: tuple[int, ...]) -> None:
        self.runtime.connector.start_send(Transfer(request_id, task.decode_worker, blocks, task.tag,
                                                   self.runtime.spec.kv_transfer.timeout_s))
        self._sending.add(request_id)
        self._sent[(request_id, task.tag)] = None
        while len(self._sent) > SENT_MEMORY:
            self._sent.popitem(last=False)
