"""CUDA graphs for decode-only steps: the whole forward and LM head replayed as one launch.

A decode step's shapes depend only on its batch size once the block tables are padded to the longest context the
engine serves, so each batch-size bucket (1, 2, 4, 8, then multiples of 8) is captured once into persistent input
buffers: all of them when the engine is built (`capture_all`), before any KV transfer thread runs beside a capture.
A step of B requests copies its inputs into the smallest bucket >= B and replays; the padding rows write no KV
(slot -1) and see no context (length 0), and their logits are dropped. Needs the paged Triton attention (the torch
path's gathers have data-dependent shapes) and serves steps up to `max_batch` requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from pdserve.engine.kv_cache import AttentionMetadata, KVCache, PagedBatch
from pdserve.engine.model import LlamaModel
from pdserve.engine.scheduler import ScheduledChunk

log = logging.getLogger(__name__)


def buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes captured: 1, 2, 4, 8, 16, 24, ... up to max_batch (which is always one)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return tuple(sorted(set(sizes)))


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, max_batch: int, max_model_len: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = buckets(max_batch)
        self.max_batch = max_batch
        device = kv_cache.tensor.device
        width = -(-max_model_len // kv_cache.block_size)
        # Persistent inputs, written before every replay.
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)  # [B]
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)  # [B]
        self.slots = torch.full((max_batch,), -1, dtype=torch.long, device=device)  # [B]
        self.context_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)  # [B]
        self.block_tables = torch.zeros(max_batch, width, dtype=torch.int32, device=device)  # [B, W]
        self.query_starts = torch.arange(max_batch + 1, dtype=torch.int32, device=device)  # [B + 1]
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: torch.Tensor | None = None
        """[max_batch, V]: every bucket's graph writes its logits here, so the buckets share one output buffer (one
        each would hold the sum of all bucket sizes x V: 2 GiB in fp32 for 256 sequences of Llama-3's vocabulary)."""
        self._pool = None

    def capture_all(self) -> float:
        """Capture every bucket now, largest first, with padding rows only (no KV written, no context read: a graph
        depends on its bucket, not on the data); the seconds it took."""
        started = time.perf_counter()
        self.slots.fill_(-1)
        self.context_lens.zero_()
        for bucket in reversed(self.buckets):
            self._capture(bucket)
        return time.perf_counter() - started

    def serves(self, chunks: Sequence[ScheduledChunk]) -> bool:
        """Every chunk decodes one token and samples, and there are at most max_batch of them."""
        return 0 < len(chunks) <= self.max_batch and all(len(c.token_ids) == 1 and c.sample for c in chunks)

    def run(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """Replay the bucket for len(chunks) requests; returns their logits [B, V]."""
        batch = len(chunks)
        bucket = next(b for b in self.buckets if b >= batch)
        self._fill(chunks, bucket)
        if bucket not in self._graphs:
            self._capture(bucket)
        self._graphs[bucket].replay()
        return self._logits[:batch]

    def _fill(self, chunks: Sequence[ScheduledChunk], bucket: int) -> None:
        block_size = self.kv_cache.block_size
        batch = len(chunks)
        width = max(len(c.block_ids) for c in chunks)
        host_tables = torch.zeros(batch, width, dtype=torch.int32)
        for row, chunk in enumerate(chunks):
            host_tables[row, :len(chunk.block_ids)] = torch.tensor(chunk.block_ids, dtype=torch.int32)
        positions = [c.start_pos for c in chunks]
        slots = [c.block_ids[p // block_size] * block_size + p % block_size for c, p in zip(chunks, positions)]
        pad = bucket - batch
        host = torch.tensor([[c.token_ids[0] for c in chunks] + [0] * pad,
                             positions + [0] * pad,
                             slots + [-1] * pad,
                             [c.context_len for c in chunks] + [0] * pad], dtype=torch.long).pin_memory()
        device_rows = host.to(self.input_ids.device, non_blocking=True)  # [4, bucket]
        self.input_ids[:bucket].copy_(device_rows[0])
        self.positions[:bucket].copy_(device_rows[1])
        self.slots[:bucket].copy_(device_rows[2])
        self.context_lens[:bucket].copy_(device_rows[3])
        self.block_tables[:batch, :width].copy_(host_tables.pin_memory(), non_blocking=True)

    def _forward(self, bucket: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:bucket],
            paged=PagedBatch(query_starts=self.query_starts[:bucket + 1], context_lens=self.context_lens[:bucket],
                             block_tables=self.block_tables[:bucket], max_query_len=1))
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], self.kv_cache, meta)  # [B, hidden]
        return self.model.logits(hidden)  # [B, V]

    @torch.inference_mode()
    def _capture(self, bucket: int) -> None:
        """Warm up (Triton compiles its kernels) on a side stream, then capture into the shared memory pool.

        Thread-local, should a bucket ever be captured while the worker's KV transfer threads copy on their own
        streams (`capture_all` runs before they exist): their stream queries and allocations then neither join nor
        invalidate it, as in torch's default global mode they would (a device-wide synchronize still would)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            warm = self._forward(bucket)  # [bucket, V]
        torch.cuda.current_stream().wait_stream(stream)
        if self._logits is None:
            self._logits = torch.empty(self.max_batch, warm.shape[-1], dtype=warm.dtype, device=warm.device)
        del warm
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._logits[:bucket].copy_(self._forward(bucket))
        self._pool = graph.pool()
        self._graphs[bucket] = graph
        log.info("captured a CUDA graph for decode steps of %d requests", bucket)
