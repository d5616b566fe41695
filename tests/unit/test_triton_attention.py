"""The paged Triton kernels against plain attention, on CPU under Triton's interpreter (CI has no GPU).

Covers decoding rows, a prefill from position 0 and a prefill chunk behind a cached prefix in one call, GQA groups
of 1, 3 and 4, block tables in scrambled order; `store_kv` skipping padding slots; and the whole engine with the
paged kernels giving transformers' greedy tokens.
"""

import pytest
import torch

pytest.importorskip("triton")  # tests/conftest.py sets TRITON_INTERPRET=1 before anything imports it

from pdserve.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from pdserve.engine.kv_cache import PagedBatch  # noqa: E402
from pdserve.engine.triton_attention import paged_attention, store_kv  # noqa: E402

from .test_model_vs_transformers import CASES, _greedy, _reference  # noqa: E402


def reference(q, k_cache, v_cache, tables, contexts, lengths):
    """Each chunk's queries (the last `length` of its `context` tokens) attend causally, computed naively."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    out, row = torch.empty_like(q), 0
    for table, context, length in zip(tables, contexts, lengths):
        slots = [table[p // block_size] * block_size + p % block_size for p in range(context)]
        keys = k_cache.flatten(0, 1)[slots].repeat_interleave(heads // kv_heads, dim=1)  # [S, H, D]
        values = v_cache.flatten(0, 1)[slots].repeat_interleave(heads // kv_heads, dim=1)
        queries = q[row:row + length]  # [Q, H, D]
        scores = torch.einsum("qhd,shd->hqs", queries, keys) / q.shape[-1] ** 0.5
        positions = torch.arange(context - length, context)
        scores.masked_fill_(torch.arange(context)[None, :] > positions[:, None], float("-inf"))
        out[row:row + length] = torch.einsum("hqs,shd->qhd", scores.softmax(-1), values)
        row += length
    return out


@pytest.mark.parametrize("heads, kv_heads, block_size", [(4, 4, 16), (6, 2, 8), (8, 2, 16)])
def test_kernel_matches_plain_attention(heads, kv_heads, block_size):
    gen = torch.Generator().manual_seed(heads)
    dim, num_blocks = 16, 24
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    contexts = [1, 37, 70, 20, 45]  # two decoding rows, then prefills: from 0, and behind a cached prefix
    lengths = [1, 1, 70, 20, 13]
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for context in contexts:
        blocks = -(-context // block_size)
        tables.append(order[used:used + blocks])
        used = (used + blocks) % (num_blocks - 6)
    q = torch.randn(sum(lengths), heads, dim, generator=gen)
    width = max(len(t) for t in tables)
    starts = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    batch = PagedBatch(query_starts=starts, context_lens=torch.tensor(contexts, dtype=torch.int32),
                       block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
                       max_query_len=max(lengths))
    got = paged_attention(q, k_cache, v_cache, batch)
    torch.testing.assert_close(got, reference(q, k_cache, v_cache, tables, contexts, lengths), atol=1e-4, rtol=1e-4)


def test_store_kv_writes_slots_and_skips_negative_ones():
    k_cache, v_cache = torch.zeros(4, 8, 2, 16), torch.zeros(4, 8, 2, 16)
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    store_kv(k_cache, v_cache, k, v, torch.tensor([17, -1, 3]))
    assert torch.equal(k_cache.flatten(0, 1)[17], k[0]) and torch.equal(v_cache.flatten(0, 1)[3], v[2])
    assert int((k_cache != 0).any(dim=(-1, -2)).sum()) == 2  # the padding row wrote nothing


def test_engine_with_paged_kernels_matches_transformers(tmp_path):
    reference_model = _reference(CASES["llama-untied"], tmp_path)
    engine = Engine(EngineConfig(model=str(tmp_path), attention="triton", max_num_batched_tokens=48,
                                 num_kv_blocks=64, block_size=8))
    assert engine.runner.paged
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 70, 1)]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        assert list(output.token_ids) == _greedy(reference_model, prompt, 6)
    assert engine.blocks.num_used == 0
