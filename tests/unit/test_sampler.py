"""Sampler and filter_logits on hand-made logits: greedy, temperature, top-k, top-p and per-request seeds."""

import torch

from pdserve.engine.sampler import Sampler, filter_logits, filter_rows
from pdserve.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


def draws(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    """n single-row draws from one sampler (its shared generator advances between them)."""
    sampler = Sampler(seed, "cpu")
    return [sampler.sample(logits[None], [params], [0])[0] for _ in range(n)]


def test_greedy_is_argmax_for_every_row():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    tokens = Sampler(0, "cpu").sample(logits, [GREEDY] * 5, range(5))
    assert tokens == logits.argmax(dim=-1).tolist()


def test_greedy_rows_ignore_sampling_rows_in_the_same_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    params = [GREEDY, SamplingParams(temperature=1.0), GREEDY, SamplingParams(temperature=2.0, seed=3)]
    tokens = Sampler(0, "cpu").sample(logits, params, [0, 1, 2, 3])
    assert tokens[0] == logits[0].argmax().item() and tokens[2] == logits[2].argmax().item()
    assert all(0 <= t < 50 for t in tokens)


def test_top_k_one_equals_greedy_even_at_high_temperature():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    assert set(draws(logits, SamplingParams(temperature=100.0, top_k=1), 200)) == {int(logits.argmax())}


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 4.0, 3.0, 0.5, 2.0])
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_k=2)))
    assert kept.tolist() == [False, True, True, False, False]
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_k=0))).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.05, 0.5, 0.15, 0.3]  # shuffled so the sort and scatter back are exercised
    kept = torch.isfinite(filter_logits(logits_of(probs), SamplingParams(top_p=0.7)))
    assert kept.tolist() == [False, True, False, True]
    kept = torch.isfinite(filter_logits(logits_of(probs), SamplingParams(top_p=0.9)))
    assert kept.tolist() == [False, True, True, True]
    kept = torch.isfinite(filter_logits(logits_of(probs), SamplingParams(top_p=0.4)))
    assert kept.tolist() == [False, True, False, False]


def test_top_p_draws_only_from_the_nucleus_in_proportion():
    tokens = draws(logits_of([0.5, 0.3, 0.15, 0.05]), SamplingParams(top_p=0.7), 2000)
    assert set(tokens) == {0, 1}
    assert 0.57 < tokens.count(0) / len(tokens) < 0.68  # 0.5 / 0.8 = 0.625 after renormalising


def test_temperature_divides_logits():
    logits = torch.tensor([1.0, -2.0, 3.0])
    assert torch.allclose(filter_logits(logits, SamplingParams(temperature=2.0)), logits / 2)


def test_very_low_temperature_is_greedy():
    logits = logits_of([0.3, 0.25, 0.25, 0.2])
    assert set(draws(logits, SamplingParams(temperature=0.01), 300)) == {0}


def test_high_temperature_flattens_the_distribution():
    logits = logits_of([0.7, 0.1, 0.1, 0.1])
    low = draws(logits, SamplingParams(temperature=0.5), 2000)
    high = draws(logits, SamplingParams(temperature=5.0), 2000)
    assert low.count(0) > 1800  # p(0) ~ 0.94 at temperature 0.5
    assert high.count(0) < 800  # p(0) ~ 0.35 at temperature 5
    assert set(high) == {0, 1, 2, 3}


def test_seeded_row_is_independent_of_batch_position_and_other_rows():
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(1000, generator=gen)
    seeded = SamplingParams(temperature=1.0, seed=7)
    alone = Sampler(0, "cpu").sample(row[None], [seeded], [3])[0]
    others = torch.randn(3, 1000, generator=gen)
    batch = torch.stack([others[0], others[1], row, others[2]])
    params = [SamplingParams(temperature=1.0), GREEDY, seeded, SamplingParams(temperature=1.0, seed=8)]
    in_batch = Sampler(123, "cpu").sample(batch, params, [0, 5, 3, 9])[2]
    assert in_batch == alone
    again = Sampler(99, "cpu")
    again.sample(others, [SamplingParams(temperature=1.0)] * 3, [0, 1, 2])  # advance the shared generator
    assert again.sample(row[None], [seeded], [3])[0] == alone


def test_seeded_draws_depend_on_position_and_seed():
    logits = torch.zeros(1000)  # uniform: any two independent draws rarely agree
    sampler = Sampler(0, "cpu")

    def draw(seed: int, position: int) -> int:
        return sampler.sample(logits[None], [SamplingParams(seed=seed)], [position])[0]

    by_position = [draw(7, p) for p in range(20)]
    assert by_position == [draw(7, p) for p in range(20)]
    assert len(set(by_position)) >= 15
    by_seed = [draw(s, 0) for s in range(20)]
    assert len(set(by_seed)) >= 15


def test_shared_generator_is_reproducible_from_the_engine_seed():
    logits = torch.zeros(1000)
    params = SamplingParams(temperature=1.0)
    assert draws(logits, params, 10, seed=5) == draws(logits, params, 10, seed=5)
    assert draws(logits, params, 10, seed=5) != draws(logits, params, 10, seed=6)


def test_top_p_at_exact_boundary_keeps_only_the_smallest_set():
    probs = [0.5, 0.25, 0.125, 0.125]  # powers of two: the cumulative masses are exact in fp32
    kept = torch.isfinite(filter_logits(logits_of(probs), SamplingParams(top_p=0.75)))
    assert kept.tolist() == [True, True, False, False]


def test_tiny_temperature_does_not_crash():
    logits = torch.tensor([[1.0, 5.0, 2.0]])
    assert Sampler(0, "cpu").sample(logits, [SamplingParams(temperature=1e-39)], [0]) == [1]


def test_rows_filtered_together_equal_each_row_filtered_alone():
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(6))
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.5),
              SamplingParams(temperature=2.0, top_k=3, top_p=0.9), SamplingParams()]
    together = filter_rows(logits, params)
    for row, p in enumerate(params):
        assert torch.equal(together[row], filter_rows(logits[row:row + 1], [p])[0])
    assert int(torch.isfinite(together[0]).sum()) == 5 and torch.isfinite(together[3]).all()
