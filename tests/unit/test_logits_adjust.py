"""The logit changes sampling parameters ask for, checked against their definitions on hand-made logits, and on a
random-weight engine where each shows in the output (`engine.logits_adjust`, `engine.sampler`)."""

import pytest
import torch

from pdserve.engine import Engine, EngineConfig, SamplingParams
from pdserve.engine.logits_adjust import TokenHistory, adjust_logits
from pdserve.engine.request import FinishReason
from pdserve.engine.sampler import Sampler, filter_rows
from pdserve.engine.sampling_params import SamplingError

LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
EOS = (5,)


def adjusted(params: SamplingParams, prompt=(), output=(), position=None) -> torch.Tensor:
    history = TokenHistory(tuple(prompt), tuple(output))
    return adjust_logits(LOGITS, [params], [len(output) if position is None else position], [history], EOS)[0]


def test_neutral_parameters_leave_the_logits_untouched_without_a_copy():
    assert adjust_logits(LOGITS, [SamplingParams()], [0], [None], EOS) is LOGITS


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    row = adjusted(SamplingParams(repetition_penalty=2.0), prompt=(0, 1), output=(3,))
    assert row.tolist() == [1.0, -2.0, 0.5, 1.5, -2.0, 1.0]


def test_frequency_and_presence_penalties_count_the_output_only():
    row = adjusted(SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), prompt=(2,), output=(3, 3, 0))
    assert row.tolist() == pytest.approx([2.0 - 0.5 - 1.0, -1.0, 0.5, 3.0 - 1.0 - 1.0, -2.0, 1.0])


def test_logit_bias_adds_and_allowed_tokens_mask_the_rest():
    assert adjusted(SamplingParams(logit_bias=((4, 10.0),))).argmax().item() == 4
    row = adjusted(SamplingParams(allowed_token_ids=(1, 4)))
    assert torch.isinf(row[[0, 2, 3, 5]]).all() and row[[1, 4]].tolist() == [-1.0, -2.0]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    params = SamplingParams(max_tokens=8, min_tokens=2, stop_token_ids=(3,))
    early = adjusted(params, position=1)
    assert torch.isinf(early[[3, 5]]).all() and early.argmax().item() == 0
    assert torch.equal(adjusted(params, position=2), LOGITS[0])
    ignoring = adjusted(SamplingParams(max_tokens=8, min_tokens=2, ignore_eos=True), position=0)
    assert not torch.isinf(ignoring[5])  # EOS does not stop such a request: nothing to mask


def test_min_p_drops_tokens_far_less_likely_than_the_top_one():
    probs = torch.softmax(LOGITS, dim=-1)[0]
    row = filter_rows(LOGITS.clone(), [SamplingParams(min_p=0.3)])[0]
    kept = (~torch.isinf(row)).nonzero().flatten().tolist()
    assert kept == [i for i in range(6) if probs[i] >= 0.3 * probs.max()] == [0, 3]


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", float("nan")),
                                          ("repetition_penalty", 0.0), ("min_p", 1.5), ("min_tokens", 17),
                                          ("logit_bias", ((3, 101.0),)), ("allowed_token_ids", (-1,))])
def test_out_of_range_values_are_refused_naming_the_field(field, value):
    with pytest.raises(SamplingError, match=f"^{field}: "):
        SamplingParams(max_tokens=16, **{field: value})


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(model="random:smollm2-135m", num_kv_blocks=64, num_threads=1))


def test_on_an_engine_each_change_shows_in_greedy_output(engine):
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    plain = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].token_ids
    biased = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                      logit_bias=((42, 100.0),)))[0].token_ids
    assert biased == (42,) * 6 != plain
    allowed = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                       allowed_token_ids=(7, 9)))[0].token_ids
    assert set(allowed) <= {7, 9}
    no_repeats = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                          logit_bias=((42, 5.0),), presence_penalty=2.0,
                                                          frequency_penalty=2.0))[0].token_ids
    assert no_repeats.count(42) < 6
    eos = engine.eos_token_ids[0]
    stops = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, min_tokens=3,
                                                     logit_bias=((eos, 100.0),)))[0]
    assert len(stops.token_ids) == 4 and stops.token_ids[-1] == eos and eos not in stops.token_ids[:3]
    assert stops.finish_reason == FinishReason.STOP


def test_ids_outside_the_vocabulary_are_refused_by_the_engine(engine):
    with pytest.raises(ValueError, match="out of vocabulary"):
        engine.add_request("oov", [1, 2], SamplingParams(logit_bias=((10**6, 1.0),)))


def test_the_sampler_applies_the_changes_before_greedy_and_sampled_picks():
    sampler = Sampler(0, "cpu")
    sampler.eos_token_ids = EOS
    params = [SamplingParams(temperature=0, logit_bias=((4, 10.0),)),
              SamplingParams(temperature=1.0, seed=3, allowed_token_ids=(2,))]
    assert sampler.sample(LOGITS.repeat(2, 1), params, [0, 0]) == [4, 2]
