"""Speculative decoding on the real SmolLM2 engine, by prompt lookup, with a draft model (the model with int4
layers) and by lookahead decoding: greedy output token-identical to decoding without it (alone, in a batch, with stop
strings, with requests that do not speculate beside it); a copy-heavy prompt accepts most of prompt lookup's
proposals, and the draft most of its own on any text; sampled requests speculate with the draft and end cleanly."""

import pytest

from pdserve.engine import Engine, EngineConfig, SamplingParams
from pdserve.engine.config import SpeculativeSettings
from pdserve.engine.request import Message, Prompt

pytestmark = pytest.mark.model

SOURCE = '''def propose(tokens, k):
    for n in range(3, 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []
'''
COPY = Prompt(text=SOURCE + "\n# The same function again:\n" + SOURCE[:40])  # the model goes on copying
PROMPTS = [COPY, Prompt(messages=(Message("user", "Repeat this code exactly:\n" + SOURCE),)),
           Prompt(text="The capital of France is"), Prompt(text="1, 2, 3, 4, 5, 6, 7,"),
           Prompt(messages=(Message("user", "Write a haiku about the sea."),))]


GREEDY = SamplingParams(max_tokens=48, temperature=0)


@pytest.fixture(scope="module")
def expected(engine):
    """Every prompt's greedy output without speculation (made once for the module)."""
    return engine.generate(PROMPTS, GREEDY)


@pytest.fixture(scope="module")
def speculating() -> Engine:
    return Engine(EngineConfig(speculative=SpeculativeSettings(method="prompt_lookup", k=4, max_batch=4,
                                                               adaptive=False)))


def test_greedy_output_is_token_identical_with_prompt_lookup(expected, speculating):
    for prompt, want in zip(PROMPTS, expected):  # alone
        before = speculating.speculative_accepted_total, speculating.speculative_proposed_total
        (got,) = speculating.generate([prompt], GREEDY)
        assert got.token_ids == want.token_ids and got.text == want.text
        if prompt is COPY:  # copying its prompt, most proposals are what the model would write
            accepted = speculating.speculative_accepted_total - before[0]
            assert accepted > (speculating.speculative_proposed_total - before[1]) // 2 > 0
    for batch in (3, 5):  # three speculate together; five are past max_batch 4 and decode one token a step
        together = speculating.generate(PROMPTS[:batch], GREEDY)
        assert [o.token_ids for o in together] == [o.token_ids for o in expected[:batch]]


def test_stops_and_requests_that_do_not_speculate_are_as_without_it(engine, speculating):
    stop = SamplingParams(max_tokens=60, temperature=0, stop=("return",))
    sampled = SamplingParams(max_tokens=20, temperature=0.8, seed=5)
    penalised = SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.3)
    params = [stop, sampled, penalised]
    expected = engine.generate([COPY] * 3, params)
    got = speculating.generate([COPY] * 3, params)
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == [
        (o.token_ids, o.text, o.finish_reason) for o in expected]
    assert speculating.num_requests == 0 and speculating.blocks.num_used == 0


@pytest.fixture(scope="module")
def drafting() -> Engine:
    return Engine(EngineConfig(speculative=SpeculativeSettings(method="draft", k=4, max_batch=4, adaptive=False)))


def test_greedy_output_is_token_identical_with_a_draft_model(expected, drafting):
    before = drafting.speculative_accepted_total, drafting.speculative_proposed_total
    for prompt, want in zip(PROMPTS, expected):
        (got,) = drafting.generate([prompt], GREEDY)
        assert got.token_ids == want.token_ids and got.text == want.text
    accepted = drafting.speculative_accepted_total - before[0]
    assert accepted > (drafting.speculative_proposed_total - before[1]) * 3 // 4  # int4 layers agree most times
    together = drafting.generate(PROMPTS[:3], GREEDY)
    assert [o.token_ids for o in together] == [o.token_ids for o in expected[:3]]


def test_sampled_and_seeded_requests_with_a_draft_model(engine, drafting):
    sampled = SamplingParams(max_tokens=40, temperature=0.8, ignore_eos=True)  # speculates: its distribution kept
    seeded = SamplingParams(max_tokens=20, temperature=0.8, seed=5)  # does not: its seed's stream is kept
    steps = drafting.speculative_steps_total
    outputs = drafting.generate(PROMPTS[:2] + [COPY], [sampled, sampled, seeded])
    assert [len(o.token_ids) for o in outputs[:2]] == [40, 40] and drafting.speculative_steps_total > steps
    assert outputs[2].token_ids == engine.generate([COPY], seeded)[0].token_ids
    assert drafting.num_requests == 0 and drafting.blocks.num_used == 0


@pytest.fixture(scope="module")
def looking_ahead() -> Engine:
    return Engine(EngineConfig(speculative=SpeculativeSettings(method="lookahead", max_batch=4, lookahead_window=4,
                                                               lookahead_ngram=3, adaptive=False)))


def test_greedy_output_is_token_identical_with_lookahead(expected, looking_ahead):
    before = looking_ahead.speculative_accepted_total
    for prompt, want in zip(PROMPTS, expected):
        (got,) = looking_ahead.generate([prompt], GREEDY)
        assert got.token_ids == want.token_ids and got.text == want.text
    assert looking_ahead.speculative_accepted_total > before  # some n-grams were right
    together = looking_ahead.generate(PROMPTS[:3], GREEDY)
    assert [o.token_ids for o in together] == [o.token_ids for o in expected[:3]]
    assert looking_ahead.num_requests == 0 and looking_ahead.blocks.num_used == 0
