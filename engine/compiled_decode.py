"""Compiled decode steps for the torch attention path (`engine.compile` off CUDA): a decode-only step's whole
forward, LM head included, as one torch.compile'd graph.

Why: at batch 1 on a CPU an eager step spends more time dispatching ~45 small ops a layer than the matmuls take
(BENCHMARKS.md, issue 20). Compiling each layer's dense parts (`engine.acceleration.compile_layers`) fuses those ops
but enters a compiled region 60 times a step, and on a CPU the entries cost about what the fusion saves; one graph
for the whole step enters once.

The graph does not write the KV cache: inductor turns an in-place write into a view of an input (one layer of the
cache) into copies of the whole cache, seconds a step. So each layer attends to its past, gathered from the cache
by the block table, plus the new token's own key and value, and the graph returns every layer's new keys and values
`[L, B, KVH, D]`; `run` then writes them into their slots with one `index_copy_` for K and one for V.

Life of a step: `serves(chunks)` (every chunk decodes one token and samples) -> `run(chunks)`: token ids, positions
and block tables (padded to at least two blocks) in; the compiled forward; the KV write; logits `[B, V]` out.
The batch and the table width are dynamic sizes: torch.compile builds one graph for batch 1 and one for larger
batches (a size of one is always specialised). The engine compiles both before it reports ready (`warm_up`: tens of
seconds on two cores, a few once inductor's on-disk cache has them), so that no request waits for a compile.
Prefill and mixed steps run eager.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pdserve.engine.attention import gather_blocks
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.model import LlamaModel
from pdserve.engine.scheduler import ScheduledChunk

MIN_WIDTH = 2
"""Block tables are padded to at least this many blocks: torch.compile specialises a size of 1, and a graph for the
first block alone would be compiled again for every later one."""


class CompiledDecode:
    def __init__(self, model: LlamaModel, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self._forward = torch.compile(self._decode)

    def serves(self, chunks: Sequence[ScheduledChunk]) -> bool:
        """Every chunk decodes one token and samples."""
        return len(chunks) > 0 and all(len(c.token_ids) == 1 and c.sample and c.lookahead is None for c in chunks)

    def run(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """Decode one token for each chunk; returns their logits [B, V]."""
        block_size = self.kv_cache.block_size
        width = max(MIN_WIDTH, max(len(c.block_ids) for c in chunks))
        device = self.kv_cache.tensor.device
        tables = torch.tensor([list(c.block_ids) + [0] * (width - len(c.block_ids)) for c in chunks],
                              device=device)  # [B, W]
        positions = torch.tensor([c.start_pos for c in chunks], device=device)  # [B]
        input_ids = torch.tensor([c.token_ids[0] for c in chunks], device=device)  # [B]
        rows = torch.arange(len(chunks), device=device)
        slots = tables[rows, positions // block_size] * block_size + positions % block_size  # [B]
        logits, keys, values = self._compiled(input_ids, positions, tables)
        flat = self.kv_cache.tensor.flatten(2, 3)  # [2, L, NB * BS, KVH, D], a view
        flat[0].index_copy_(1, slots, keys)
        flat[1].index_copy_(1, slots, values)
        return logits

    @torch.inference_mode()  # as the steps run: grad mode is part of the graphs' guards
    def warm_up(self) -> float:
        """Compile both graphs (batch 1 and larger) now, on a step's worth of dummy inputs, so that no request waits
        for a compile; returns the seconds it took. Nothing is written: the graph leaves the cache alone."""
        started = time.monotonic()
        device = self.kv_cache.tensor.device
        for batch in (1, 2):
            zeros = torch.zeros(batch, dtype=torch.long, device=device)  # [B]
            self._compiled(zeros, zeros.clone(), torch.zeros(batch, MIN_WIDTH, dtype=torch.long, device=device))
        return time.monotonic() - started

    def _compiled(self, input_ids: torch.Tensor, positions: torch.Tensor,
                  tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mark_dynamic_sizes(input_ids, positions, tables)
        return self._forward(input_ids, positions, tables)

    def _decode(self, input_ids: torch.Tensor, positions: torch.Tensor,
                tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, positions: [B]; tables: [B, W] -> logits [B, V], new keys and values [L, B, KVH, D]."""
        model = self.model
        h = model.embed[input_ids]  # [B, hidden]
        cos, sin = model.rope.tables(positions)  # [B, 1, D]
        mask = past_and_new_mask(positions, tables.shape[1] * self.kv_cache.block_size, h.dtype)  # [B, 1, 1, S+1]
        keys, values = [], []
        for index, layer in enumerate(model.layers):
            q, k, v = layer.before_attention(h, cos, sin)  # [B, H, D], [B, KVH, D], [B, KVH, D]
            k_cache, v_cache = self.kv_cache.layer(index)
            out = attend_past_and_new(q, k, v, k_cache, v_cache, tables, mask)  # [B, H, D]
            h = layer.after_attention(h, out)
            keys.append(k)
            values.append(v)
        return model.logits(h), torch.stack(keys), torch.stack(values)


def mark_dynamic_sizes(input_ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> None:
    """The batch and the table width vary from step to step; everything else (the model, the cache) is fixed. Only
    these sizes are left symbolic, so that no fixed size that happens to equal one of them (three kv heads and a
    three-block table) ties them together; a batch of one keeps its own specialised graph."""
    torch._dynamo.maybe_mark_dynamic(tables, 1)
    if tables.shape[0] > 1:
        for tensor in (input_ids, positions, tables):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)


def past_and_new_mask(positions: torch.Tensor, past_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, past_slots + 1] additive: a request sees the past slots before its position, and its new token."""
    past = torch.arange(past_slots, device=positions.device)[None, :] < positions[:, None]  # [B, S]
    visible = F.pad(past, (0, 1), value=True)  # [B, S + 1]
    mask = torch.zeros(visible.shape, dtype=dtype, device=positions.device).masked_fill(~visible, float("-inf"))
    return mask[:, None, None, :]


def attend_past_and_new(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, tables: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q: [B, H, D]; k, v: [B, KVH, D] the new token's; caches [NB, BS, KVH, D]; tables [B, W] -> [B, H, D].

    Two matmuls and a softmax rather than scaled_dot_product_attention: with one query row per kv-head group, CPU
    SDPA's flash kernel spent ~180 us a call on blocking and threads (5 ms of a 28 ms step at 16 requests), while
    inductor fuses the scale, mask and softmax here around two small bmms (decode 1.05-1.11x faster at 16 requests,
    w8a8; BENCHMARKS.md)."""
    batch, heads, dim = q.shape
    kv_heads = k.shape[1]
    keys = torch.cat([gather_blocks(k_cache, tables), k[:, :, None, :]], dim=2)  # [B, KVH, S + 1, D]
    values = torch.cat([gather_blocks(v_cache, tables), v[:, :, None, :]], dim=2)
    queries = q.view(batch, kv_heads, heads // kv_heads, dim) * dim ** -0.5  # [B, KVH, G, D]
    weights = torch.softmax(queries @ keys.transpose(-1, -2) + mask, dim=-1)  # [B, KVH, G, S + 1]
    return (weights @ values).reshape(batch, heads, dim)
