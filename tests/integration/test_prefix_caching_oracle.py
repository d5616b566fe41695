"""Greedy output with prefix caching on the real SmolLM2 is token-identical to transformers, whether a prompt's
prefix came from the cache or not: conversation turns, a shared system prompt, a long cached prefix extended past
a chunk, and preemption with a small cache."""

import pytest

from pdserve.engine import Engine, EngineConfig, Message, Prompt, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0)
SYSTEM = Message("system", "You are a careful assistant. " + " ".join(
    f"Rule {i}: answer briefly, cite nothing, and keep units in metric form." for i in range(12)))


@pytest.fixture(scope="module")
def cached() -> Engine:
    return Engine(EngineConfig(max_num_batched_tokens=128, num_kv_blocks=256, prefix_caching=True))


def test_a_second_turn_reuses_the_first_and_matches_transformers(cached, reference_greedy):
    first_turn = (SYSTEM, Message("user", "What is the boiling point of water?"))
    first = cached.generate([Prompt(messages=first_turn)], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert list(first.token_ids) == reference_greedy(list(first.prompt_token_ids), 16)
    second_turn = first_turn + (Message("assistant", first.text), Message("user", "And its freezing point?"))
    second = cached.generate([Prompt(messages=second_turn)], GREEDY)[0]
    assert second.num_cached_tokens >= len(first.prompt_token_ids) // 16 * 16 - 16
    assert list(second.token_ids) == reference_greedy(list(second.prompt_token_ids), 16)


def test_requests_sharing_a_system_prompt_match_transformers(cached, reference_greedy):
    questions = ["Name a planet.", "How far is the moon?", "What is 7 times 6?"]
    prompts = [Prompt(messages=(SYSTEM, Message("user", q))) for q in questions]
    outputs = cached.generate(prompts, GREEDY)
    again = cached.generate(prompts[::-1], GREEDY)[::-1]  # now every prefix is cached
    for output, repeat in zip(outputs, again):
        assert repeat.num_cached_tokens >= len(repeat.prompt_token_ids) - 16
        assert list(output.token_ids) == list(repeat.token_ids) == reference_greedy(list(output.prompt_token_ids),
                                                                                   16)
    assert cached.blocks.num_used == 0


def test_a_cached_prefix_longer_than_a_chunk_extended(cached, reference_greedy):
    document = list(range(2000, 2300))  # 300 tokens: three chunks of 128
    cached.generate([document], GREEDY)
    extended = document + list(range(5000, 5040))
    output = cached.generate([extended], GREEDY)[0]
    assert output.num_cached_tokens == 288  # 18 full blocks of the document
    assert list(output.token_ids) == reference_greedy(extended, 16)


def test_preemption_with_caching_keeps_greedy_output(reference_greedy):
    engine = Engine(EngineConfig(max_num_batched_tokens=128, num_kv_blocks=24, prefix_caching=True))
    shared = list(range(3000, 3100))
    prompts = [shared + [4000 + i] * 8 for i in range(4)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outputs = engine.generate(prompts, params)
    assert engine.preemptions_total > 0
    for prompt, output in zip(prompts, outputs):
        assert list(output.token_ids) == reference_greedy(prompt, 40, ignore_eos=True)
    assert engine.blocks.num_used == 0
