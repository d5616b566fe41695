"""Logprobs of sampled tokens (`engine.logprobs`): the model's log-softmax from the raw logits, the picked token's
and the most likely alternatives', per step of a request that asks, through greedy and sampled picks and logit
changes alike (they change the pick, not the reported distribution)."""

import pytest
import torch

from pdserve.engine import Engine, EngineConfig, SamplingParams
from pdserve.engine.sampler import logprobs_of
from pdserve.engine.sampling_params import SamplingError


def test_logprobs_are_the_log_softmax_of_the_raw_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.0, 0.0, 1.0, 0.0]])
    expected = torch.log_softmax(logits, dim=-1)
    found = logprobs_of(logits, [0, 2], [2, 0])
    assert found[0].token_id == 0 and found[0].logprob == pytest.approx(expected[0, 0].item())
    assert [t for t, _ in found[0].top] == [3, 0]
    assert [v for _, v in found[0].top] == pytest.approx([expected[0, 3].item(), expected[0, 0].item()])
    assert found[1].top == () and found[1].logprob == pytest.approx(expected[1, 2].item())


def test_out_of_range_counts_are_refused():
    for bad in (-1, 21, True):
        with pytest.raises(SamplingError, match="^logprobs: "):
            SamplingParams(logprobs=bad)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(model="random:smollm2-135m", num_kv_blocks=64, num_threads=1))


def run(engine: Engine, sampling: SamplingParams, request_id: str) -> list:
    engine.add_request(request_id, [1, 2, 3, 4, 5], sampling)
    outputs = []
    while not outputs or outputs[-1].finish_reason is None:
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def test_each_step_reports_its_tokens_logprob_and_alternatives(engine):
    outputs = run(engine, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3), "lp")
    for output in outputs:
        (entry,) = output.logprobs
        assert entry.token_id == output.new_token_ids[0] and len(entry.top) == 3
        assert entry.top[0][0] == entry.token_id and entry.top[0][1] == entry.logprob  # greedy: the most likely
        assert entry.logprob <= 0 and [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
    assert all(o.logprobs == () for o in run(engine, SamplingParams(max_tokens=3, temperature=0), "none"))


def test_logit_changes_pick_another_token_but_report_the_models_logprob(engine):
    plain = run(engine, SamplingParams(max_tokens=1, temperature=0, logprobs=1), "plain")[0].logprobs[0]
    biased = run(engine, SamplingParams(max_tokens=1, temperature=0, logprobs=1, logit_bias=((42, 100.0),)),
                 "biased")[0].logprobs[0]
    assert biased.token_id == 42 != plain.token_id
    assert biased.top == plain.top and biased.logprob < plain.logprob  # the model's own distribution


def test_prompt_logprobs_equal_the_next_token_logprobs_of_each_prefix():
    """Each prompt token's logprob given the tokens before it, computed over several chunks (8 tokens a step), equals
    what a request of that prefix reports for the token when forced to pick it (the raw logprob, before the bias);
    the same prompt run again is computed again (not taken from the prefix cache) and gives the same."""
    engine = Engine(EngineConfig(model="random:smollm2-135m", num_kv_blocks=64, num_threads=1,
                                 max_num_batched_tokens=8, block_size=4))
    prompt = [5, 17, 300, 42, 42, 9, 1000, 77, 3, 12, 600, 8, 21]
    sampling = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
    first = run_prompt(engine, prompt, sampling, "p1")[0].prompt_logprobs
    assert first[0] is None and len(first) == len(prompt)
    for position in range(1, len(prompt)):
        forced = SamplingParams(max_tokens=1, temperature=0, logprobs=0, logit_bias=((prompt[position], 100.0),))
        oracle = run_prompt(engine, prompt[:position], forced, f"prefix-{position}")[0].logprobs[0]
        assert oracle.token_id == first[position].token_id == prompt[position]
        assert first[position].logprob == pytest.approx(oracle.logprob, abs=1e-4)
        assert len(first[position].top) == 2
    cached_before = engine.cached_tokens_total
    again = run_prompt(engine, prompt, sampling, "p2")[0].prompt_logprobs
    assert engine.cached_tokens_total == cached_before  # computed again, all of it
    assert [e.logprob for e in again[1:]] == pytest.approx([e.logprob for e in first[1:]], abs=1e-5)


def run_prompt(engine: Engine, prompt: list[int], sampling: SamplingParams, request_id: str) -> list:
    engine.add_request(request_id, prompt, sampling)
    outputs = []
    while not outputs or outputs[-1].finish_reason is None:
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def test_a_reserved_request_asking_for_prompt_logprobs_survives_its_preemption():
    """On a decode worker the prompt's logprobs came from the prefill worker; a preempted request recomputed there
    must not compute them again (it has no list for them: the step raised and killed the engine thread)."""
    engine = Engine(EngineConfig(model="random:tiny", num_kv_blocks=6, block_size=4, max_num_batched_tokens=64,
                                 prefix_caching=False))
    asks, plain = SamplingParams(max_tokens=8, prompt_logprobs=1, temperature=0), SamplingParams(max_tokens=8,
                                                                                                 temperature=0)
    for request_id, sampling in (("a", plain), ("b", asks)):
        assert engine.reserve_remote(request_id, list(range(1, 8)), sampling) is not None
        engine.commit_remote(request_id, 5)
    preempted, finished = [], {}
    for _ in range(40):
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.token_ids
        preempted += engine.last_schedule.preempted
        if not engine.has_unfinished():
            break
    assert preempted == ["b"] and set(finished) == {"a", "b"} and all(len(t) == 8 for t in finished.values())
