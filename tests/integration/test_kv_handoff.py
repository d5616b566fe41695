"""The disaggregation hooks: prefill on one engine, move the KV blocks, decode on another; and preemption.

Output must be token-identical to one engine doing both, for greedy and for seeded sampling.
"""

import pytest

from pdserve.engine import Engine, EngineConfig, FinishReason, SamplingParams

from .test_smollm2_oracle import GREEDY, PROMPTS


@pytest.fixture(scope="module")
def decode_engine() -> Engine:
    return Engine(EngineConfig(max_num_batched_tokens=256, num_kv_blocks=512))


def _disaggregated(prefill: Engine, decode: Engine, prompts, params) -> list[tuple[int, ...]]:
    ids = [f"pd-{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params):
        prefill.add_request(rid, prompt, p, prefill_only=True)
    handed: dict[str, tuple[int, ...]] = {}
    while len(handed) < len(ids):
        for out in prefill.step():
            assert out.finish_reason is FinishReason.PREFILLED, out
            src = prefill.held_block_ids(out.request_id)
            p = params[ids.index(out.request_id)]
            dst = decode.reserve_remote(out.request_id, out.prompt_token_ids, p)
            assert dst is not None and len(dst) >= len(out.prompt_token_ids) // decode.config.block_size
            decode.kv_cache.write_blocks(dst, prefill.kv_cache.read_blocks(src))
            prefill.release(out.request_id)
            decode.commit_remote(out.request_id, out.new_token_ids[0])
            handed[out.request_id] = out.token_ids
    final = {}
    while decode.has_unfinished():
        for out in decode.step():
            if out.finished:
                final[out.request_id] = out.token_ids
    assert prefill.blocks.num_used == 0 and decode.blocks.num_used == 0
    return [final[rid] for rid in ids]


def test_handoff_greedy_matches_single_engine(engine, decode_engine):
    single = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    assert _disaggregated(engine, decode_engine, PROMPTS, [GREEDY] * len(PROMPTS)) == single


def test_handoff_seeded_sampling_matches_single_engine(engine, decode_engine):
    params = [SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=i) for i in range(len(PROMPTS))]
    single = [o.token_ids for o in engine.generate(PROMPTS, params)]
    assert _disaggregated(engine, decode_engine, PROMPTS, params) == single


def test_prefill_only_request_that_ends_at_first_token_frees_blocks(engine):
    engine.add_request("one", PROMPTS[0], SamplingParams(max_tokens=1, temperature=0), prefill_only=True)
    [out] = engine.step()
    assert out.finish_reason is FinishReason.LENGTH and engine.blocks.num_used == 0


def test_reserve_remote_refuses_when_full_and_release_frees(decode_engine):
    params = SamplingParams(max_tokens=4, temperature=0)
    assert decode_engine.reserve_remote("big", list(range(100, 100 + 16 * 400)), params) is not None
    assert decode_engine.reserve_remote("too-big", list(range(100, 100 + 16 * 200)), params) is None
    assert decode_engine.num_requests == 1
    decode_engine.release("big")
    assert decode_engine.blocks.num_used == 0 and decode_engine.num_requests == 0


def test_preemption_recomputes_and_matches_transformers(reference_greedy):
    """A cache too small for the batch: newest requests are preempted, recomputed, and still exact."""
    small = Engine(EngineConfig(max_num_batched_tokens=256, num_kv_blocks=24, block_size=16))
    prompts = [PROMPTS[i] for i in (0, 1, 2, 4, 5)] * 2  # ~10 x (40 prompt + 40 output) tokens > 24 x 16 slots
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outputs = small.generate(prompts, params)
    assert small.preemptions_total > 0
    for output in outputs:
        assert list(output.token_ids) == reference_greedy(list(output.prompt_token_ids), 40, ignore_eos=True)
    assert small.blocks.num_used == 0
