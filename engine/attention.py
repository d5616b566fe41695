"""Attention over the paged KV cache.

New keys and values are written into their slots first; then each query reads its request's blocks. Decoding
requests (one query each) are batched: their blocks are gathered into `[B, KVH, S, D]` and masked to each context
length. A prefill chunk attends causally to its own fresh keys, or, when earlier chunks exist, to its gathered
blocks with an offset causal mask. The gather is the CPU path; when the step's metadata carries a `PagedBatch`, the
Triton kernels of `engine.triton_attention` (CUDA) read the block tables directly instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.kv_cache import AttentionMetadata, DecodeGroup, PrefillSegment


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k_cache, v_cache: [NB, BS, KVH, D]; k, v: [T, KVH, D]; slots: [T]."""
    kvh, dim = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, dim).index_copy_(0, slots, k)
    v_cache.view(-1, kvh, dim).index_copy_(0, slots, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] (already rotated); returns [T, H, D]."""
    if meta.paged is not None:
        from pdserve.engine import triton_attention  # imports triton, which only the paged path needs

        triton_attention.store_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return triton_attention.paged_attention(q, k_cache, v_cache, meta.paged)
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    if meta.decode is not None and not meta.prefills:
        return decode_attention(q, k_cache, v_cache, meta.decode)
    out = torch.empty_like(q)
    if meta.decode is not None:
        out[:meta.decode.size] = decode_attention(q[:meta.decode.size], k_cache, v_cache, meta.decode)
    for seg in meta.prefills:
        rows = slice(seg.row, seg.row + seg.length)
        out[rows] = prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, seg)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     group: DecodeGroup) -> torch.Tensor:
    """q: [B, H, D] -> [B, H, D]. Each kv head's G query heads are the 'query length' of one SDPA call."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    keys = gather_blocks(k_cache, group.block_tables)  # [B, KVH, S, D]
    values = gather_blocks(v_cache, group.block_tables)
    queries = q.view(batch, kv_heads, heads // kv_heads, dim)  # [B, KVH, G, D]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=group.key_mask)
    return out.reshape(batch, heads, dim)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, seg: PrefillSegment) -> torch.Tensor:
    """q: [Q, H, D]; k, v: [Q, KVH, D] this chunk's own keys -> [Q, H, D]."""
    if seg.mask is None:
        keys, values = k, v  # [Q, KVH, D]: the chunk is the whole context
    else:
        context = seg.start_pos + seg.length
        keys = k_cache.index_select(0, seg.block_ids).flatten(0, 1)[:context]  # [S, KVH, D]
        values = v_cache.index_select(0, seg.block_ids).flatten(0, 1)[:context]
    groups = q.shape[1] // k.shape[1]
    # 4-D inputs: SDPA's fused CPU kernel takes only [B, H, S, D] (3-D falls back to the ~5x slower math path).
    queries = q.transpose(0, 1)[None]  # [1, H, Q, D]
    keys = keys.transpose(0, 1).repeat_interleave(groups, dim=0)[None]  # [1, H, S, D]
    values = values.transpose(0, 1).repeat_interleave(groups, dim=0)[None]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=seg.mask, is_causal=seg.mask is None)
    return out[0].transpose(0, 1)


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache: [NB, BS, KVH, D]; block_tables: [B, MB] -> [B, KVH, MB*BS, D].

    index_select copies whole blocks and is ~3.5x faster on CPU than advanced indexing (cache[block_tables])."""
    batch, _, kv_heads, dim = block_tables.shape[0], *cache.shape[1:]
    blocks = cache.index_select(0, block_tables.flatten())  # [B * MB, BS, KVH, D]
    return blocks.view(batch, -1, kv_heads, dim).transpose(1, 2)
