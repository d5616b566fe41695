"""Paged attention in Triton: kernels that read each request's block table directly, with no gather of its KV.

One kernel serves decoding (one query per request) and prefill chunks (many queries, with or without a cached
prefix): a program takes one chunk, one kv head and a tile of query tokens, and walks the chunk's keys block by
block through the block table with an online softmax. The rows of a tile are (query token, query head) pairs of
the kv head's group, so a decoding request reads its KV once for all the heads that share it (GQA).

`store_kv` writes the step's new keys and values into their slots (a negative slot is skipped: the padding rows of
a captured CUDA graph). On CPU both run only under Triton's interpreter (`TRITON_INTERPRET=1`), which is how CI
checks them against the reference attention in `engine.attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.engine.kv_cache import PagedBatch

BLOCK_N = 32
"""Keys per inner step."""
DECODE_ROWS = 16
"""Tile rows when every chunk has one query (tl.dot needs at least 16)."""
PREFILL_ROWS = 64
"""Tile rows for prefill chunks."""


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_kt, stride_vt, stride_cache_slot,
                     WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token)
    if slot >= 0:
        offsets = tl.arange(0, BLOCK)
        inside = offsets < WIDTH
        k = tl.load(k_ptr + token * stride_kt + offsets, mask=inside)
        v = tl.load(v_ptr + token * stride_vt + offsets, mask=inside)
        tl.store(k_cache_ptr + slot * stride_cache_slot + offsets, k, mask=inside)
        tl.store(v_cache_ptr + slot * stride_cache_slot + offsets, v, mask=inside)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k_cache, v_cache: [NB, BS, KVH, D] contiguous per slot; k, v: [T, KVH, D]; slots: [T] (negative: skip)."""
    tokens, kv_heads, dim = k.shape
    if tokens == 0:
        return
    k, v = k.reshape(tokens, kv_heads * dim), v.reshape(tokens, kv_heads * dim)
    width = kv_heads * dim
    _store_kv_kernel[(tokens,)](k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0), k_cache.stride(1),
                                WIDTH=width, BLOCK=triton.next_power_of_2(width))


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, query_starts_ptr, context_lens_ptr, block_tables_ptr, scale,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_table,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_TOKENS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    chunk = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(query_starts_ptr + chunk)
    q_len = tl.load(query_starts_ptr + chunk + 1) - q_start
    if tile * TILE_TOKENS < q_len:
        context = tl.load(context_lens_ptr + chunk)
        first_pos = context - q_len  # position of the chunk's first query token
        rows = tl.arange(0, BLOCK_M)
        token = tile * TILE_TOKENS + rows // GROUP  # [M] query token within the chunk
        head = kv_head * GROUP + rows % GROUP  # [M] query head
        row_ok = (rows < TILE_TOKENS * GROUP) & (token < q_len)
        dims = tl.arange(0, HEAD_DIM)
        q_rows = (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptr + q_rows, mask=row_ok[:, None], other=0.0)  # [M, D]
        q_pos = first_pos + token  # [M]
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        key_end = tl.minimum(context, first_pos + (tile + 1) * TILE_TOKENS)  # causal: no key past the tile's last
        for key_start in range(0, key_end, BLOCK_N):
            keys = key_start + tl.arange(0, BLOCK_N)  # [N] key positions
            key_ok = keys < key_end
            block = tl.load(block_tables_ptr + chunk * stride_table + keys // BLOCK_SIZE, mask=key_ok, other=0)
            kv_rows = (block * stride_cb + (keys % BLOCK_SIZE) * stride_cs + kv_head * stride_ch)[:, None]
            k = tl.load(k_cache_ptr + kv_rows + dims[None, :], mask=key_ok[:, None], other=0.0)  # [N, D]
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [M, N]
            else:
                scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            visible = (keys[None, :] <= q_pos[:, None]) & key_ok[None, :]
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that see no key yet
            correction = tl.exp(row_max - safe_max)
            weights = tl.exp(scores - safe_max[:, None])  # [M, N]
            row_sum = row_sum * correction + tl.sum(weights, 1)
            v = tl.load(v_cache_ptr + kv_rows + dims[None, :], mask=key_ok[:, None], other=0.0)  # [N, D]
            if IEEE:
                acc = acc * correction[:, None] + tl.dot(weights, v, input_precision="ieee")
            else:
                acc = acc * correction[:, None] + tl.dot(weights.to(v.dtype), v).to(tl.float32)
            row_max = new_max
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        out_rows = (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + out_rows, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: PagedBatch) -> torch.Tensor:
    """q: [T, H, D] (rotated); k_cache, v_cache: [NB, BS, KVH, D] with this step's keys already stored.
    Returns [T, H, D]: each chunk's queries attend causally to its context through its block table."""
    tokens, heads, dim = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    block_m = DECODE_ROWS if batch.max_query_len == 1 else PREFILL_ROWS
    block_m = max(block_m, triton.next_power_of_2(group))
    tile_tokens = max(1, block_m // group)
    chunks = batch.context_lens.shape[0]
    grid = (chunks, kv_heads, triton.cdiv(batch.max_query_len, tile_tokens))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, batch.query_starts, batch.context_lens, batch.block_tables, dim ** -0.5,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), batch.block_tables.stride(0),
        GROUP=group, HEAD_DIM=dim, BLOCK_SIZE=block_size, TILE_TOKENS=tile_tokens, BLOCK_M=block_m,
        BLOCK_N=BLOCK_N, IEEE=q.dtype == torch.float32)
    return out
