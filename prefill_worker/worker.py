"""The prefill worker (a Ray actor in a cluster; a plain object in unit tests).

Life of a request here:

    prefill(task) -> the engine's queue (prefill-only; batched with other prompts, chunked when long)
      (a cached prefix of the prompt is taken from this worker's prefix cache, not computed)
      -> first token sampled, blocks held -> start_send(blocks -> the decode worker's reserved blocks, under the
         tag that worker chose; the leading blocks that worker holds already are not sent)
      -> announced to the decode worker, which posts the receive
      -> the first token goes back to the router at once, while the KV is on the wire
      -> the send's outcome (done, failed, cancelled, timed out) -> blocks released.

With `kv_transfer.layerwise` the send starts earlier: when the engine schedules the request's last prompt chunk
(`Engine.on_final_chunk`), announced without its first token; each layer's KV goes as the step computes it; after
the step a `FirstToken` tells the decode worker the token (or that the request ended at it, and the KV is dropped).

The handoff runs between the two workers alone: once a prefill has started, it ends the same way whether its
router is still there or not (a router that died leaves the decode worker to reap the request). If the first token
already ends the request (EOS, a stop, max_tokens 1) nothing is sent and its blocks are freed at once. `abort`
drops a queued or running prefill; a send already on the wire finishes (the decode worker receives and drops what
it no longer wants) and then frees the blocks.

The worker keeps its KV pairs with the decode workers itself (`worker.kv_pairs`). Everything that touches the engine
or the connector runs on the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from pdserve.engine.engine import Engine
from pdserve.engine.layer_progress import LayerProgress
from pdserve.engine.request import FinishReason, RequestOutput
from pdserve.engine.step_profile import StepProfile, profile_engine
from pdserve.kv_transfer.connector import KVConnector, Transfer, TransferError
from pdserve.registry.entries import WorkerInfo
from pdserve.registry.registry import Registry
from pdserve.worker.aborted import AbortedRequests
from pdserve.worker.engine_thread import EngineThread
from pdserve.worker.kv_pairs import PairKeeper
from pdserve.worker.messages import FirstToken, KVAnnouncement, PrefillResult, PrefillTask
from pdserve.worker.runtime import WorkerRuntime, WorkerSpec

log = logging.getLogger(__name__)


class DecodePeers(Protocol):
    """Where this worker's KV goes: tells a decode worker that a send to it started (on the event loop)."""

    def announce(self, decode_worker: str, announcement: KVAnnouncement | FirstToken) -> None: ...


@dataclass
class _Prefill:
    task: PrefillTask
    result: Future
    enqueued: float
    started: float | None = None
    streamed: tuple[int, ...] | None = None
    """Layer-wise streaming: the blocks whose send started with its last chunk's step."""


class PrefillWorker:
    def __init__(self, spec: WorkerSpec, connector: KVConnector | None = None,
                 thread: EngineThread | None = None, peers: DecodePeers | None = None) -> None:
        """`peers`: the decode workers (a test's own); by default the KV pairs this worker keeps from the
        registry."""
        self.runtime = WorkerRuntime(spec, self._after_step, connector, thread)
        self.pairs: PairKeeper | None = None
        if peers is None and spec.redis_url is not None:
            peers = self.pairs = PairKeeper(self.runtime, Registry(spec.redis_url, spec.cluster))
        self.peers = peers
        self._prefilling: dict[str, _Prefill] = {}
        self._sending: set[str] = set()
        self._unheld: set[str] = set()
        """Streamed sends of requests that ended at their first token: the engine freed their blocks already."""
        self._aborted = AbortedRequests()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pairing: asyncio.Task | None = None

    # ---- called by routers (asyncio side) --------------------------------------------------------------------
    async def start(self) -> WorkerInfo:
        self._loop = asyncio.get_running_loop()
        info = await self.runtime.start()
        if self.runtime.spec.kv_transfer.layerwise and self.runtime.connector.streams_layers:
            await self.runtime.call(lambda engine: setattr(engine, "on_final_chunk", partial(self._stream, engine)))
        if self.pairs is not None:
            self._pairing = asyncio.create_task(self.pairs.run(), name=f"pairs-{self.runtime.spec.worker_id}")
        return info

    async def connect(self, peer: str, store_address: str, rank: int, generation: int = 0) -> None:
        await self.runtime.connect(peer, store_address, rank, generation)

    async def info(self) -> WorkerInfo:
        return self.runtime.info()

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        """The first token, once the prompt is prefilled and its KV is on the wire; none (finish reason ABORT) if
        the request's router aborted it, before or after this call was run (`worker.aborted`)."""
        if task.request_id in self._aborted:
            return _aborted(task.request_id)
        result: Future = Future()
        await self.runtime.call(lambda engine: self._add(engine, task, result))
        return await asyncio.wrap_future(result)

    async def abort(self, request_id: str) -> None:
        """Drop the request here if its prefill has not finished (a send already on the wire finishes)."""
        self._aborted.add(request_id)  # before any await: a prefill run after this refuses it
        await self.runtime.call(lambda engine: self._abort(engine, request_id))

    async def metrics(self) -> list:
        """This worker's Prometheus metric families (served by the router at /metrics/workers)."""
        return self.runtime.metric_families()

    async def profile(self) -> StepProfile:
        """Time a few synthetic steps on this (idle) engine: the controller's performance model."""
        return await self.runtime.call(profile_engine)

    async def drain(self) -> None:
        """Finish what is here and take nothing new (before a role switch or removal)."""
        await self.runtime.drain()

    async def idle(self) -> bool:
        """Nothing queued, prefilling or being sent."""
        return await self.runtime.call(
            lambda engine: not engine.num_requests and not self._prefilling and not self._sending)

    async def stop(self) -> None:
        await self._stop_pairing()
        self.runtime.stop()

    async def leave(self) -> EngineThread:
        """Leave the cluster under this identity for a role switch in place (see `WorkerRuntime.leave`)."""
        await self._stop_pairing()
        return await self.runtime.leave()

    async def _stop_pairing(self) -> None:
        if self._pairing is not None:
            self._pairing.cancel()
            await asyncio.gather(self._pairing, return_exceptions=True)
        if self.pairs is not None:
            await self.pairs.close()

    # ---- on the engine thread --------------------------------------------------------------------------------
    def _add(self, engine: Engine, task: PrefillTask, result: Future) -> None:
        engine.add_request(task.request_id, list(task.token_ids), task.sampling, prefill_only=True,
                           resumed_tokens=task.resumed_tokens, priority=task.priority)
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
            if result.transfer_id in self._unheld:
                self._unheld.discard(result.transfer_id)
            else:
                engine.release(result.transfer_id)  # on every outcome; the decode side frees its own

    def _first_token(self, engine: Engine, output: RequestOutput, now: float) -> None:
        p = self._prefilling.pop(output.request_id, None)
        if p is None:
            return
        started = p.started or self.runtime.thread.step_started  # one chunk: it started in this step
        handed_off = output.finish_reason is FinishReason.PREFILLED
        if p.streamed is not None:
            self._follow_stream(output, p, handed_off)
        elif handed_off:
            try:
                self._send(output.request_id, p.task, engine.held_block_ids(output.request_id)[p.task.skip_blocks:],
                           output)
            except TransferError as e:  # no working pair with that decode worker (it broke): the router retries
                log.warning("KV of %s cannot go to %s: %s", output.request_id, p.task.decode_worker, e)
                engine.release(output.request_id)
                p.result.set_result(PrefillResult(output.request_id, None, "", FinishReason.ABORT, 0.0, 0.0))
                return
        if handed_off:
            self.runtime.metrics.kv_bytes_not_sent += p.task.skip_blocks * engine.kv_cache.block_bytes
        p.result.set_result(PrefillResult(
            output.request_id, output.new_token_ids[0], output.text_delta,
            None if handed_off else output.finish_reason, started - p.enqueued, now - started,
            output.num_cached_tokens, output.logprobs[0] if output.logprobs else None, output.prompt_logprobs))

    def _stream(self, engine: Engine, request_id: str, block_ids: tuple[int, ...]) -> LayerProgress | None:
        """`Engine.on_final_chunk`, inside a step: start sending the request's KV, layer by layer as the step
        computes it, and announce it without its first token (a `FirstToken` follows). None: not streamed (it is
        not a handoff from here, or there is no pair with its decode worker: it is sent, or fails, after the step)."""
        p = self._prefilling.get(request_id)
        if p is None:
            return None
        progress = LayerProgress(engine.model_config.num_layers, engine.kv_cache.tensor.device)
        blocks = block_ids[p.task.skip_blocks:]
        try:
            self._send(request_id, p.task, blocks, None, progress)
        except TransferError:
            return None
        p.streamed = blocks
        return progress

    def _follow_stream(self, output: RequestOutput, p: _Prefill, handed_off: bool) -> None:
        """After the step of a streamed send: tell the decode worker the first token, or that the request ended."""
        if not handed_off:  # ended at its first token: the engine freed the blocks the send reads (only for KV
            self._unheld.add(output.request_id)  # that the decode worker drops)
        elif self.runtime.engine.held_block_ids(output.request_id)[p.task.skip_blocks:] != p.streamed:
            log.error("KV of %s: the blocks held after its last step differ from those streamed during it",
                      output.request_id)
        token = FirstToken(output.request_id, p.task.tag, output.new_token_ids[0],
                           output.logprobs[0] if output.logprobs else None, finished=not handed_off)
        self._loop.call_soon_threadsafe(self.peers.announce, p.task.decode_worker, token)

    def _abort(self, engine: Engine, request_id: str) -> None:
        p = self._prefilling.pop(request_id, None)
        if p is not None:
            engine.abort(request_id)
            p.result.set_result(_aborted(request_id))

    def _send(self, request_id: str, task: PrefillTask, blocks: tuple[int, ...], output: RequestOutput | None,
              progress: LayerProgress | None = None) -> None:
        """Start sending `blocks` (those after the ones the decode worker holds already, `task.skip_blocks`) and
        announce it: with the first token from `output`, or without it (None) while the step is streaming them."""
        self.runtime.connector.start_send(Transfer(request_id, task.decode_worker, blocks, task.tag,
                                                   self.runtime.spec.kv_transfer.timeout_s, progress))
        self._sending.add(request_id)
        first, logprobs = None, None
        if output is not None:
            first, logprobs = output.new_token_ids[0], (output.logprobs[0] if output.logprobs else None)
        announcement = KVAnnouncement(request_id, task.tag, self.runtime.spec.worker_id, first, len(blocks), logprobs)
        self._loop.call_soon_threadsafe(self.peers.announce, task.decode_worker, announcement)

def _aborted(request_id: str) -> PrefillResult:
    return PrefillResult(request_id, None, "", FinishReason.ABORT, 0.0, 0.0)
