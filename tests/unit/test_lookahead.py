"""Lookahead decoding (`engine.lookahead`): the chunk's positions and attention mask, the verification of n-gram
candidates, the Jacobi window's move and the pool it feeds; and on a tiny random model, greedy output
token-identical to decoding without it, with no block left behind."""

import pytest
import torch

from pdserve.engine import Engine, EngineConfig, SamplingParams
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import ConfigError, SpeculativeSettings
from pdserve.engine.lookahead import Layout, LookaheadState
from pdserve.engine.request import Request
from pdserve.engine.scheduler import Scheduler


def test_positions_follow_each_guess_and_candidate_from_the_input():
    layout = Layout(width=3, levels=2, candidates=((7, 8), (7, 9)))
    # input at 10; level 0 at 11, 12, 13; level 1 at 12, 13, 14; each candidate at 11, 12
    assert layout.positions(10) == [10, 11, 12, 13, 12, 13, 14, 11, 12, 11, 12]


def test_each_token_sees_the_input_and_its_own_causal_path():
    layout = Layout(width=3, levels=2, candidates=((7, 8),))
    seen = layout.mask()
    rows = {(r, c) for r, c in zip(*torch.nonzero(seen, as_tuple=True)) for r, c in [(int(r), int(c))]}
    expected = {(0, 0),
                (1, 0), (1, 1),  # level 0, column 0
                (2, 0), (2, 1), (2, 2),
                (3, 0), (3, 1), (3, 2), (3, 3),
                (4, 0), (4, 1), (4, 4),  # level 1, column 0: level 0's column 0, then itself
                (5, 0), (5, 1), (5, 2), (5, 5),
                (6, 0), (6, 1), (6, 2), (6, 3), (6, 6),
                (7, 0), (7, 7),  # candidate token 0
                (8, 0), (8, 7), (8, 8)}
    assert rows == expected


def test_the_longest_agreeing_candidate_wins_and_the_window_moves_on():
    state = LookaheadState(width=2, levels=2, window=[[20, 21], [30, 31]])
    layout = Layout(width=2, levels=2, candidates=((5, 6), (5, 9)))
    # rows: input, window (20, 21, 30, 31), candidate 0 (5, 6), candidate 1 (5, 9)
    picks = [5, 0, 0, 40, 41, 6, 11, 9, 12]
    emitted, accepted = state.advance(layout, picks)
    assert emitted == (5, 6, 11) and accepted == 2  # candidate 0: 5 and 6 agree, then the pick after 6
    assert LookaheadState.accepted_rows(layout, emitted) == [5, 6]
    assert state.window == [[30, 31], [40, 41]]  # level 0 dropped, the last level's picks appended
    assert list(state.pool[20]) == [(30, 40)] and list(state.pool[21]) == [(31, 41)]  # each column's trajectory
    assert state.advance(Layout(2, 2, ((7, 7),)), [3, 0, 0, 0, 0, 0, 0]) == ((3,), 0)  # none agrees: the pick


def test_the_pool_starts_with_the_prompts_ngrams_most_recent_first():
    state = LookaheadState.start([1, 2, 3, 1, 4, 5], width=2, levels=2)
    assert state.window == [[4, 5], [4, 5]]
    assert state.layout(1, max_candidates=4).candidates == ((4, 5), (2, 3))
    assert state.layout(9, max_candidates=4).candidates == ()


BASE = dict(model="random:tiny", num_kv_blocks=512, max_num_seqs=64, max_num_batched_tokens=4096, num_threads=1,
            prefix_caching=False)


@pytest.mark.parametrize("width, ngram", [(4, 3), (2, 5), (3, 2)])
def test_greedy_output_is_token_identical_with_lookahead(width, ngram):
    plain = Engine(EngineConfig(**BASE))
    looking = Engine(EngineConfig(**BASE, speculative=SpeculativeSettings(
        method="lookahead", max_batch=8, lookahead_window=width, lookahead_ngram=ngram, adaptive=False)))
    prompts = [[5, 9, 13, 7], [3, 3, 3], list(range(1, 12)), [15, 0, 15, 0, 15]]
    greedy = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in plain.generate(prompts, greedy)]
    assert [o.token_ids for o in looking.generate(prompts, greedy)] == expected  # together
    for prompt, want in zip(prompts, expected):
        assert looking.generate([prompt], greedy)[0].token_ids == want  # alone
    assert looking.speculative_accepted_total > 0  # n-grams were accepted
    assert looking.num_requests == 0 and looking.blocks.num_used == 0


def test_lookahead_needs_the_torch_attention_path():
    with pytest.raises(ConfigError, match="lookahead"):
        EngineConfig(attention="triton", speculative=SpeculativeSettings(method="lookahead"))
    with pytest.raises(ConfigError, match="lookahead_ngram"):
        SpeculativeSettings(method="lookahead", lookahead_ngram=1)


def test_the_scheduler_gives_a_decoding_request_its_window_and_candidates_when_they_fit():
    settings = SpeculativeSettings(method="lookahead", max_batch=4, lookahead_window=2, lookahead_ngram=3)
    prompt = (1, 2, 3, 1, 4, 5)

    def decoding(budget: int):
        sched = Scheduler(BlockManager(16, 4, False), budget, 4, settings)
        request = Request("r", prompt, SamplingParams(max_tokens=10, temperature=0), 0, speculative=True)
        sched.add(request)
        (chunk,) = sched.schedule().chunks  # the prefill
        sched.advance(chunk, request)
        request.output_token_ids.append(1)
        (chunk,) = sched.schedule().chunks
        return request, chunk

    request, chunk = decoding(budget=64)
    # the last token, the window (2 levels of the context's last 2 tokens), the pool's n-grams after 1
    assert chunk.token_ids == (1, 5, 1, 5, 1, 4, 5, 2, 3) and chunk.lookahead.candidates == ((4, 5), (2, 3))
    assert chunk.start_pos == 6 and len(request.block_ids) * 4 >= chunk.context_len
    _, small = decoding(budget=6)  # window and candidates do not fit the step's budget: a plain decode
    assert small.token_ids == (1,) and small.lookahead is None


def test_the_engine_reports_its_decode_steps_to_the_governor_both_ways():
    """Adaptive (the default): decode-only steps are timed with speculation and, one in 16, without."""
    looking = Engine(EngineConfig(**BASE, speculative=SpeculativeSettings(method="lookahead")))
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    assert looking.generate([[5, 9, 13, 7]], greedy)[0].token_ids == Engine(EngineConfig(**BASE)).generate(
        [[5, 9, 13, 7]], greedy)[0].token_ids
    costs = looking.scheduler.governor._costs
    assert costs[1, True].samples > 0 and costs[1, False].samples > 0


@pytest.mark.parametrize("settings", [
    SpeculativeSettings(method="lookahead", max_batch=8, adaptive=False),
    SpeculativeSettings(method="prompt_lookup", k=4, max_batch=8),
    SpeculativeSettings(method="draft", k=3, max_batch=8, draft_layers=1, draft_quantization="none", adaptive=False),
], ids=["lookahead", "prompt_lookup", "draft"])
def test_speculating_requests_preempted_for_room_resume_token_identical(settings):
    """Too few KV blocks for four requests: the newest are preempted (their blocks freed, recomputed later) while
    the others speculate, and every output is still the plain engine's."""
    tight = {**BASE, "num_kv_blocks": 14}
    prompts = [[5, 9, 13, 7], [3, 3, 3], list(range(1, 12)), [15, 0, 15, 0, 15]]
    greedy = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in Engine(EngineConfig(**BASE)).generate(prompts, greedy)]
    engine = Engine(EngineConfig(**tight, speculative=settings))
    assert [o.token_ids for o in engine.generate(prompts, greedy)] == expected
    assert engine.preemptions_total > 0 and engine.speculative_steps_total > 0
    assert engine.num_requests == 0 and engine.blocks.num_used == 0


def test_a_window_that_would_pass_the_context_length_is_not_used():
    """Near the end of the context a window's positions would run past the rotary table: it decodes plainly there."""
    prompt = [(i * 3) % 13 + 1 for i in range(56)]
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    settings = SpeculativeSettings(method="lookahead", adaptive=False)
    looking = Engine(EngineConfig(model="random:tiny", max_model_len=64, num_kv_blocks=64, speculative=settings))
    reference = Engine(EngineConfig(model="random:tiny", max_model_len=64, num_kv_blocks=64))
    assert looking.generate([prompt], plain)[0].token_ids == reference.generate([prompt], plain)[0].token_ids
