"""The speculation governor (`engine.speculation_governor`): speculation stays on until measured, goes off where it
costs more per token than plain decoding, keeps probing both ways, and comes back when it pays again."""

from pdserve.engine.speculation_governor import LEARN_EVERY, MIN_SAMPLES, PROBE_EVERY, Governor


def run(governor: Governor, batch: int, steps: int, spec_cost: float, plain_cost: float) -> list[bool]:
    """`steps` steps at this batch size, each observed at the given seconds per token; which speculated."""
    decisions = []
    for _ in range(steps):
        speculated = governor.speculate(batch)
        governor.observe(batch, speculated, spec_cost if speculated else plain_cost, 1)
        decisions.append(speculated)
    return decisions


def test_speculation_that_costs_more_per_token_turns_off_and_comes_back_when_it_pays():
    governor = Governor(max_batch=4)
    first = run(governor, 2, LEARN_EVERY * MIN_SAMPLES, spec_cost=0.03, plain_cost=0.02)
    assert first[:LEARN_EVERY - 1] == [True] * (LEARN_EVERY - 1) and first[LEARN_EVERY - 1] is False  # a probe
    assert not governor.pays(2)  # measured both ways (a probe every LEARN_EVERY steps meanwhile): slower per token
    later = run(governor, 2, PROBE_EVERY * 4, spec_cost=0.03, plain_cost=0.02)
    assert sum(later) == 4  # off, but one step in PROBE_EVERY still tries it
    assert governor.pays(1) and run(Governor(4), 1, 3, 0.03, 0.02) == [True] * 3  # other sizes: not measured yet
    run(governor, 2, PROBE_EVERY * 40, spec_cost=0.01, plain_cost=0.02)  # the text now copies its input
    assert governor.pays(2)


def test_no_speculation_past_max_batch():
    governor = Governor(max_batch=4)
    assert governor.speculate(4) and not governor.speculate(5) and not governor.speculate(0)


def test_a_governor_that_is_not_adaptive_always_speculates_up_to_max_batch():
    governor = Governor(max_batch=2, adaptive=False)
    assert run(governor, 2, PROBE_EVERY * MIN_SAMPLES * 2, spec_cost=0.03, plain_cost=0.02) == [True] * (
        PROBE_EVERY * MIN_SAMPLES * 2)
    assert not governor.speculate(3)
