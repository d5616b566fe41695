"""The scenario family (`bench.scenarios`) and the study's goodput search (`bench.scenario_study`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from pdserve.bench.scenario_study import RESOLUTION, parse_seeds, parse_settings, search
from pdserve.bench.scenarios import DURATION_S, MIX, ScenarioTraffic, generate
from pdserve.bench.workloads import WORKLOADS

SEEDS = range(40)


def test_a_seed_always_gives_the_same_scenario_and_seeds_differ():
    assert generate(7) == generate(7)
    assert len({generate(s).describe() for s in range(10)}) == 10


def test_the_family_covers_what_it_promises():
    scenarios = [generate(s) for s in SEEDS]
    assert {s.hardware for s in scenarios} == {"h100", "h200", "a100"}
    assert {s.model for s in scenarios} == {"llama-3-8b", "llama-3-70b"}
    assert all(4 <= s.workers <= 16 for s in scenarios)
    assert {s.shifts for s in scenarios} == {"sudden", "slow", "mixed"}
    assert any(s.bursts for s in scenarios) and any(not s.bursts for s in scenarios)
    for s in scenarios:
        assert s.tensor_parallel == (1 if s.model == "llama-3-8b" else 2 if s.hardware == "h200" else 4)
        assert s.knots[0].t_s == 0 and s.duration_s == DURATION_S
        assert all(a.t_s < b.t_s for a, b in zip(s.knots, s.knots[1:]))
        assert all(k.rate > 0 and math.isclose(sum(k.shares), 1.0) for k in s.knots)
        assert 0 < s.slo_tpot_s < s.slo_ttft_s


def test_traffic_follows_the_rate_and_the_mix():
    scenario = generate(1)
    trace = ScenarioTraffic(scenario).at(1.0)
    times = np.array([e.arrival_s for e in trace])
    assert np.all(np.diff(times) >= 0) and 0 <= times[0] and times[-1] <= DURATION_S
    knots = scenario.knots
    expected = sum((b.t_s - a.t_s) * (a.rate + b.rate) / 2 for a, b in zip(knots, knots[1:]))
    assert not scenario.bursts
    assert len(trace) == pytest.approx(expected, rel=0.03)
    # A flat phase of one workload sends only that workload's lengths.
    for a, b in zip(knots, knots[1:]):
        pure = [i for i, share in enumerate(a.shares) if share > 0.999]
        if a.rates == b.rates and pure and b.t_s - a.t_s > 30:
            dist = WORKLOADS[MIX[pure[0]]].input
            inside = [e for e in trace if a.t_s + 1 < e.arrival_s < b.t_s - 1]
            assert inside and all(dist.low <= e.input_tokens <= dist.high for e in inside)
            assert np.mean([e.input_tokens for e in inside]) == pytest.approx(dist.mean, rel=0.15)


def test_a_busier_run_is_the_same_requests_denser():
    traffic = ScenarioTraffic(generate(2))
    base, busy = traffic.at(1.0), traffic.at(1.5)
    assert len(busy) == pytest.approx(1.5 * len(base), rel=0.03)
    # The first requests keep their lengths: the search compares the same requests at each rate.
    assert [(e.input_tokens, e.output_tokens) for e in base[:200]] == [
        (e.input_tokens, e.output_tokens) for e in busy[:200]]
    assert busy[100].arrival_s < base[100].arrival_s


def test_bursts_raise_the_rate_while_they_last():
    scenario = next(s for s in map(generate, SEEDS) if len(s.bursts) == 1)
    burst = scenario.bursts[0]

    def inside(s) -> int:
        trace = ScenarioTraffic(s).at(1.0)
        return sum(1 for e in trace if burst.start_s <= e.arrival_s < burst.start_s + burst.duration_s)

    without = inside(dataclasses.replace(scenario, bursts=()))
    assert inside(scenario) == pytest.approx(burst.factor * without, rel=0.25)


def test_a_bad_factor_is_refused():
    with pytest.raises(ValueError, match="factor"):
        ScenarioTraffic(generate(0)).at(0.0)


@pytest.mark.parametrize("knee", [0.11, 0.5, 0.93, 3.7])
def test_the_search_finds_the_knee(knee):
    def run(factor: float) -> tuple[float, int]:  # attainment falls linearly through 0.9 at the knee
        return min(1.0, max(0.0, 0.9 - (factor - knee) * 2)), 0

    found = search(run)
    assert found.factor == pytest.approx(knee, rel=RESOLUTION)
    assert len(found.points) <= 12


def test_seeds_and_settings_parse():
    assert parse_seeds("0-2,10,12-13") == [0, 1, 2, 10, 12, 13]
    assert parse_settings(["cooldown_s=10", "max_moves=2", "shift_ratio=inf"]) == {
        "cooldown_s": 10.0, "max_moves": 2, "shift_ratio": math.inf}
    with pytest.raises(ValueError, match="name=value"):
        parse_settings(["cooldown_s"])


@pytest.mark.parametrize(("argv", "named"), [
    (["plan", "--scenarios", "0"], "--out"),
    (["plan", "--scenarios", "0-x", "--out", "OUT"], "--scenarios"),
    (["plan", "--scenarios", "0", "--out", "OUT", "--set", "cooldown=5"], "'cooldown' is not a controller setting"),
    (["plan", "--scenarios", "0", "--out", "OUT", "--set", "cooldown_s=-1"], "cooldown_s"),
    (["plan", "--workload", "chat", "--slo-ttft", "1"], "--workers, --slo-tpot required"),
    (["plan", "--workload", "chat", "--workers", "4", "--slo-ttft", "1", "--slo-tpot", "0.05",
      "--set", "scale_down_load=0.96"], "scale_down_load: must be below target_load"),
    *[(["plan", "--workload", "chat", "--workers", "2", "--slo-ttft", "1", "--slo-tpot", "0.05", "--fast", *flag],
       flag[0]) for flag in (["--window-s", "0"], ["--peak-window-s", "0", "--peak-fleet"],
                             ["--hand-on-after-s", "-1"], ["--role-switch-s", "nan"], ["--worker-start-s", "-5"],
                             ["--search-runs", "1"], ["--search", "2", "1"])],  # were a traceback, or ran
])
def test_plan_refuses_bad_scenario_flags_by_name(argv, named, tmp_path, capsys):
    from pdserve.cli import main

    assert main([str(tmp_path) if a == "OUT" else a for a in argv]) == 2
    assert named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
