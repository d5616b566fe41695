"""Speculative decoding with a draft model (`engine.draft`) and by prompt lookup, through the acceptance rule
(`engine.rejection`), on a tiny random Llama whose whole distribution can be enumerated: sampled output is
distributed as the model's own (a chi-square test against the exact distribution, which the draft's own distribution
fails), and greedy output is token-identical to decoding without speculation."""

import pytest
import torch

from pdserve.engine import Engine, EngineConfig, SamplingParams, model_runner
from pdserve.engine.config import ConfigError, SpeculativeSettings
from pdserve.engine.rejection import accept, certain

VOCAB = 16
PROMPT = [5, 9, 13, 7]
COPYING = [t for a in range(VOCAB) for t in (7, a, (5 * a + 3) % VOCAB)] + [7]
"""Every 2-gram (7, a) occurs in it: whatever its first token, prompt lookup proposes a continuation."""
TEMPERATURE = 0.1  # the tiny model's random logits spread ~0.4: sharpened, its distributions are far from uniform
SAMPLES = 3000
BASE = dict(model="random:tiny", num_kv_blocks=512, max_num_seqs=256, max_num_batched_tokens=4096, num_threads=1,
            prefix_caching=False)
DRAFT = SpeculativeSettings(method="draft", k=2, max_batch=256, draft_layers=1, draft_quantization="none",
                            adaptive=False)
LOOKUP = SpeculativeSettings(method="prompt_lookup", k=2, max_batch=256, adaptive=False)


@pytest.fixture(scope="module")
def plain() -> Engine:
    return Engine(EngineConfig(**BASE))


@pytest.fixture(scope="module")
def speculating() -> Engine:
    return Engine(EngineConfig(**BASE, speculative=DRAFT))


@pytest.fixture(scope="module")
def looking_up() -> Engine:
    return Engine(EngineConfig(**BASE, speculative=LOOKUP))


def next_token_probs(engine: Engine, contexts: list[list[int]]) -> torch.Tensor:
    """[C, V] the model's exact sampling distribution after each context (its logprobs, sharpened by TEMPERATURE)."""
    outputs = engine.generate(contexts, SamplingParams(max_tokens=1, temperature=0, logprobs=VOCAB))
    logprobs = torch.full((len(contexts), VOCAB), float("-inf"))
    for row, output in enumerate(outputs):
        for token, value in output.logprobs[0].top:
            logprobs[row, token] = value
    return torch.softmax(logprobs / TEMPERATURE, dim=-1)


def exact_marginals(engine: Engine, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact distributions of the second and the third output token, [V] each."""
    first = next_token_probs(engine, [prompt])[0]  # [V]
    second = next_token_probs(engine, [prompt + [a] for a in range(VOCAB)])  # [V, V]: row a = after a
    third = next_token_probs(engine, [prompt + [a, b] for a in range(VOCAB) for b in range(VOCAB)])  # [V*V, V]
    joint = first[:, None] * second  # [V, V] P(a, b)
    return joint.sum(0), (joint.flatten()[:, None] * third).sum(0)


def sampled_marginals(engine: Engine, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    sampling = SamplingParams(max_tokens=4, temperature=TEMPERATURE, ignore_eos=True)
    outputs = engine.generate([prompt] * SAMPLES, sampling)
    counts = torch.zeros(2, VOCAB)
    for output in outputs:
        counts[0, output.token_ids[1]] += 1
        counts[1, output.token_ids[2]] += 1
    return counts[0], counts[1]


def p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of the counts against the distribution."""
    expected = counts.sum() * probs.double()
    statistic = ((counts.double() - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2.0), statistic / 2))


@pytest.mark.parametrize("method", ["draft", "prompt_lookup"])
def test_sampled_output_follows_the_models_distribution(plain, speculating, looking_up, method):
    engine, prompt = (speculating, PROMPT) if method == "draft" else (looking_up, COPYING)
    second, third = exact_marginals(plain, prompt)
    assert second.max() < 0.5 and third.max() < 0.5  # far from greedy: the draws matter
    before = engine.speculative_proposed_total, engine.speculative_accepted_total
    counts = sampled_marginals(engine, prompt)
    proposed = engine.speculative_proposed_total - before[0]
    accepted = engine.speculative_accepted_total - before[1]
    assert proposed >= SAMPLES and 0 < accepted < proposed  # it speculated, and was right only some times
    assert p_value(counts[0], second) > 1e-3 and p_value(counts[1], third) > 1e-3
    assert engine.num_requests == 0 and engine.blocks.num_used == 0


def test_the_test_tells_the_drafts_distribution_apart(plain, speculating, monkeypatch):
    """Keeping every proposal gives the draft's distribution, which the same test rejects: it has the power to."""
    def accept_all(proposed, draft_probs, target_probs, generator):
        return (*proposed, int(torch.multinomial(target_probs[len(proposed)], 1, generator=generator)))

    second, third = exact_marginals(plain, PROMPT)
    monkeypatch.setattr(model_runner, "accept", accept_all)
    counts = sampled_marginals(speculating, PROMPT)
    assert p_value(counts[0], second) < 1e-6


def test_greedy_output_is_token_identical_with_a_draft(plain, speculating):
    prompts = [PROMPT, [3, 3, 3], list(range(1, 12)), [15, 0, 15, 0, 15]]
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in plain.generate(prompts, greedy)]
    assert [o.token_ids for o in speculating.generate(prompts, greedy)] == expected
    for prompt, want in zip(prompts, expected):
        assert speculating.generate([prompt], greedy)[0].token_ids == want


def test_acceptance_keeps_proposals_the_model_likes_and_draws_from_the_residual():
    generator = torch.Generator().manual_seed(0)
    same = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    bonus = torch.tensor([[0.0, 0.0, 1.0]])
    # p == q at every position: every proposal is kept, and the bonus token drawn from p_{k+1}
    assert accept((1, 2), same, torch.cat([same, bonus]), generator) == (1, 2, 2)
    # the model gives the first proposal no mass: rejected, the token drawn from max(0, p - q) = token 0 only
    target = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    assert accept((1, 2), same, target, generator) == (0,)
    # a proposal the draft rated 0.5 and the model 0.25 is kept half the time
    draft = torch.tensor([[0.5, 0.5, 0.0]])
    target = torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.0, 1.0]])
    kept = sum(accept((1,), draft, target, generator) == (1, 2) for _ in range(4000))
    assert 1800 < kept < 2200
    # a proposal chosen, not drawn (prompt lookup's): kept with the model's probability of it, 0.25
    chosen = certain((1,), 3, torch.device("cpu"))
    assert chosen.tolist() == [[0.0, 1.0, 0.0]]
    kept = sum(accept((1,), chosen, target, generator) == (1, 2) for _ in range(4000))
    assert 850 < kept < 1150


def test_a_draft_that_would_be_the_model_itself_is_a_config_error():
    with pytest.raises(ConfigError, match="draft would be the model itself"):
        EngineConfig(speculative=SpeculativeSettings(method="draft", draft_quantization="none"))
    with pytest.raises(ConfigError, match="draft_quantization"):
        EngineConfig(quantization="int4", speculative=SpeculativeSettings(method="draft", draft_quantization="int8"))
    with pytest.raises(ConfigError, match="draft_layers"):
        Engine(EngineConfig(**BASE, speculative=SpeculativeSettings(method="draft", draft_layers=3,
                                                                     draft_quantization="none")))
