"""The prefill worker (a Ray actor in a cluster; a plain object in unit tests).

Life of a request here:

    prefill(task) -> the engine's queue (prefill-only; batched with other prompts, chunked when long)
      -> first token sampled, blocks held -> start_send(blocks -> the decode worker's reserved blocks)
      -> the first token goes back to the router at once, while the KV is on the wire
      -> the send's outcome (done, failed, cancelled, timed out) -> blocks released.

If the first token already ends the request (EOS, a stop, max_tokens 1) nothing is sent and the blocks are freed at
once. `abort` works at every stage: a queued or running prefill is dropped, a send is cancelled; the blocks are freed
either way. Everything that touches the engine or the connector runs on the engine thread.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from dataclasses import dataclass

from pdserve.cluster.messages import PrefillResult, PrefillTask
from pdserve.cluster.registry import WorkerInfo
from pdserve.cluster.worker_runtime import WorkerRuntime, WorkerSpec
from pdserve.engine.engine import Engine
from pdserve.engine.request import FinishReason, RequestOutput
from pdserve.kv_transfer.connector import KVConnector, Transfer


@dataclass
class _Prefill:
    task: PrefillTask
    result: Future
    enqueued: float
    started: float | None = None


class PrefillWorker:
    def __init__(self, spec: WorkerSpec, connector: KVConnector | None = None) -> None:
        self.runtime = WorkerRuntime(spec, self._after_step, self._busy, connector)
        self._prefilling: dict[str, _Prefill] = {}
        self._sending: set[str] = set()

    # ---- called by the router (asyncio side) -----------------------------------------------------------------
    async def start(self) -> WorkerInfo:
        return await self.runtime.start()

    async def connect(self, peer: str, store_address: str, rank: int) -> None:
        await self.runtime.connect(peer, store_address, rank)

    async def info(self) -> WorkerInfo:
        return self.runtime.info()

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        result: Future = Future()
        await self.runtime.call(lambda engine: self._add(engine, task, result))
        return await asyncio.wrap_future(result)

    async def abort(self, request_id: str) -> None:
        await self.runtime.call(lambda engine: self._abort(engine, request_id))

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
                p.started = now  # the step that just ran held its first chunk (close enough: ends of steps)
        for result in self.runtime.connector.poll():
            self._sending.discard(result.transfer_id)
            engine.release(result.transfer_id)  # on every outcome; the decode side frees its own

    def _first_token(self, engine: Engine, output: RequestOutput, now: float) -> None:
        p = self._prefilling.pop(output.request_id, None)
        if p is None:
            return
        started = p.started or p.enqueued
        handed_off = output.finish_reason is FinishReason.PREFILLED
        if handed_off:
            blocks = engine.held_block_ids(output.request_id)
            self.runtime.connector.start_send(Transfer(output.request_id, p.task.decode_worker, blocks, p.task.tag,
                                                       self.runtime.spec.kv_transfer.timeout_s))
            self._sending.add(output.request_id)
        p.result.set_result(PrefillResult(
            output.request_id, output.new_token_ids[0], output.text_delta,
            None if handed_off else output.finish_reason, started - p.enqueued, now - started))

    def _abort(self, engine: Engine, request_id: str) -> None:
        if request_id in self._sending:
            self.runtime.connector.cancel(request_id)  # reported by the next poll, which releases the blocks
            return
        p = self._prefilling.pop(request_id, None)
        engine.abort(request_id)
        if p is not None and not p.result.done():
            p.result.set_result(PrefillResult(request_id, None, "", FinishReason.ABORT, 0.0, 0.0))

    def _busy(self) -> bool:
        return bool(self._sending)
