"""The arrival rate's trend (`controller/trend.py`): an autoscaled fleet is sized for the rate one worker start
ahead, learned from how long the last add took to serve; moves between the pools are not."""

from __future__ import annotations

import dataclasses
import math

import pytest

from pdserve.controller import (
    Action,
    ControllerState,
    Observation,
    PoolRole,
    TrafficWindow,
    WorkerObservation,
    tick,
    trend,
)
from tests.unit.test_controller import MODEL, World, make_config


def window(rate: float) -> TrafficWindow:
    return TrafficWindow(window_s=30.0, arrival_rate=rate, finished=50, mean_input_tokens=200,
                         mean_output_tokens=400, ttft_p50_s=0.1, ttft_p90_s=0.2, tpot_p50_s=0.01, tpot_p90_s=0.012,
                         attainment=1.0)


def observe(now_s: float, rate: float, starting: int = 0, fleet: int = 3) -> Observation:
    workers = tuple(WorkerObservation(f"w{i}", PoolRole.DECODE, draining=i < starting, joining=PoolRole.DECODE)
                    for i in range(fleet))
    return Observation(now_s, workers, window(rate))


def sampled(rates: list[float], interval_s: float = 5.0, state: ControllerState | None = None) -> ControllerState:
    state = state or ControllerState(traffic_since_s=-100.0)
    for i, rate in enumerate(rates):
        state = trend.record(state, observe(i * interval_s, rate))
    return state


def test_a_steady_ramp_projects_the_rate_one_lead_ahead() -> None:
    rates = [20.0 + 0.05 * 5 * i for i in range(25)]  # +0.05 req/s per second, for two minutes
    state = dataclasses.replace(sampled(rates), start_s=60.0)
    inputs: dict[str, float] = {}
    growth = trend.growth(state, observe(120.0, rates[-1]), inputs)
    assert inputs["rate_slope"] == pytest.approx(0.05)
    assert inputs["trend_lead_s"] == 75.0  # the start, and half the window (its rate is half a window old)
    assert growth == pytest.approx((rates[-1] + 0.05 * 75) / rates[-1])
    assert len(state.rate_samples) <= trend.TREND_SPAN_S / 5 + 1  # older samples are dropped


def test_the_projection_is_clamped_and_needs_half_a_span_of_samples() -> None:
    low, high = trend.GROWTH_RANGE
    steep = dataclasses.replace(sampled([10.0 * (i + 1) for i in range(25)]), start_s=60.0)
    assert trend.growth(steep, observe(120.0, 250.0), {}) == high
    falling = sampled([250.0 - 10.0 * i for i in range(25)])
    assert trend.growth(falling, observe(120.0, 10.0), {}) == low
    short = sampled([10.0 * (i + 1) for i in range(5)])  # 20 s of samples
    assert trend.growth(short, observe(20.0, 50.0), {}) == 1.0
    flat = sampled([30.0] * 25)
    assert trend.growth(flat, observe(120.0, 30.0), {}) == pytest.approx(1.0)


def test_samples_start_a_window_after_traffic_begins_and_stop_when_idle() -> None:
    state = ControllerState(traffic_since_s=0.0)
    state = trend.record(state, observe(10.0, 5.0))  # the window is a third full: its rate reads low
    assert state.rate_samples == ()
    state = trend.record(state, observe(30.0, 15.0))
    assert state.rate_samples == ((30.0, 15.0),)
    idle = Observation(35.0, (), TrafficWindow(30.0, 0.0, 0, *(math.nan,) * 7))
    assert trend.record(state, idle).rate_samples == ()


def test_the_start_time_is_learned_from_an_add_until_it_serves() -> None:
    state = trend.issued(ControllerState(), Action.ADD, observe(100.0, 10.0, fleet=2))
    assert state.add_issued_s == 100.0 and state.add_from_workers == 2
    state = trend.record(state, observe(130.0, 10.0, starting=1))  # still starting
    assert state.start_s == 0.0
    state = trend.record(state, observe(160.0, 10.0))
    assert state.start_s == 60.0 and state.add_issued_s == -math.inf
    state = trend.issued(state, Action.ADD, observe(200.0, 10.0))
    state = trend.record(state, observe(240.0, 10.0, fleet=4))  # a faster start: smoothed
    assert state.start_s == pytest.approx((1 - trend.START_ALPHA) * 60.0 + trend.START_ALPHA * 40.0)
    assert trend.issued(state, Action.MOVE, observe(300.0, 10.0)) == state


def test_an_add_the_cluster_never_placed_teaches_no_start_time() -> None:
    """An ADD refused at once, or one Ray could not place before it timed out, leaves the fleet as it was: the time
    until nothing is in transition is not a start."""
    learned = dataclasses.replace(ControllerState(), start_s=60.0)
    refused = trend.issued(learned, Action.ADD, observe(100.0, 10.0))
    refused = trend.record(refused, observe(105.0, 10.0))  # the next tick: no worker ever appeared
    assert refused.start_s == 60.0 and refused.add_issued_s == -math.inf
    timed_out = trend.issued(learned, Action.ADD, observe(100.0, 10.0))
    timed_out = trend.record(timed_out, observe(150.0, 10.0, starting=1, fleet=4))  # placing, not yet serving
    timed_out = trend.record(timed_out, observe(400.0, 10.0))  # gone again after the placement timed out
    assert timed_out.start_s == 60.0 and timed_out.add_issued_s == -math.inf


def test_a_rising_load_adds_before_the_fleet_is_above_target_load() -> None:
    """The same traffic tick by tick, once rising and once flat at each tick's rate: the rising fleet adds while
    the load it has is still within target_load, because the rate one start ahead is not."""
    config = make_config(max_workers=12, cooldown_s=10.0, target_load=0.8, scale_down_load=0.7)
    rising = World(2, 4, (30.0, 200, 400))
    state = ControllerState(fitted_input_tokens=200, start_s=60.0)
    first_add = None
    for step in range(60):
        rising.traffic = (30.0 + 0.5 * step, 200, 400)  # +0.1 req/s per second
        decision = tick(config, MODEL, state, rising.observe())
        state = decision.state
        rising.apply(decision)
        rising.now += config.interval_s
        if decision.action is Action.ADD:
            first_add = decision
            break
    assert first_add is not None and first_add.inputs["trend_growth"] > 1.0
    assert "s ahead" in first_add.reason  # the reason says the projection decided it
    flat = World(2, 4, (first_add.inputs["arrival_rate"], 200, 400))
    flat_decision = tick(config, MODEL, ControllerState(fitted_input_tokens=200), flat.observe())
    assert flat_decision.action is not Action.ADD  # the same rate with no trend is within target_load


def test_the_trend_sizes_the_budget_only_never_a_move() -> None:
    """Without a worker budget the trend changes nothing: a rising chat load moves the same workers either way."""
    config = make_config(cooldown_s=10.0)
    with_trend, without = World(3, 3, (30.0, 200, 400)), World(3, 3, (30.0, 200, 400))
    state = ControllerState(fitted_input_tokens=200, start_s=60.0)
    grew = 1.0
    for step in range(40):
        for world in (with_trend, without):
            world.traffic = (30.0 + 0.5 * step, 200, 400)
        decision = tick(config, MODEL, state, with_trend.observe())
        plain = tick(config, MODEL, dataclasses.replace(state, rate_samples=()), without.observe())
        assert plain.inputs.get("trend_growth", 1.0) == 1.0
        state = decision.state
        with_trend.apply(decision)
        without.apply(plain)
        assert decision.action is plain.action and decision.target == plain.target
        grew = max(grew, decision.inputs.get("trend_growth", 1.0))
        with_trend.now += config.interval_s
        without.now += config.interval_s
    assert grew > 1.05 and acted_moves(with_trend) > 0


def acted_moves(world: World) -> int:
    """Workers whose role differs from the start's 3:3."""
    return sum(1 for worker_id, role in world.roles.items()
               if role is not (PoolRole.PREFILL if int(worker_id[1:]) < 3 else PoolRole.DECODE))


def test_the_budget_ignores_a_prefill_backlog_the_pool_clears_before_an_added_worker_would_serve() -> None:
    from pdserve.controller.demand import PoolNeeds

    def needs(clear_s: float) -> PoolNeeds:
        return PoolNeeds(prefill=6.0, decode=4.0, prefill_steady=3.0, decode_steady=4.0,
                         inputs={"prefill_backlog_clear_s": clear_s})

    inputs: dict[str, float] = {}
    burst = trend.budget_needs(needs(20.0), 1.1, 75.0, inputs)  # gone in 20 s, the worker serves in 75 s
    assert (burst.prefill, burst.decode) == pytest.approx((3.0 * 1.1, 4.0 * 1.1))
    assert inputs["budget_ignores_backlog"] == 1.0
    lasting = trend.budget_needs(needs(200.0), 1.1, 75.0, {})  # still there when the worker serves
    assert (lasting.prefill, lasting.decode) == pytest.approx((6.0 * 1.1, 4.0 * 1.1))
    growing = trend.budget_needs(needs(math.inf), 1.0, 75.0, {})  # the pool cannot clear it at all
    assert growing.prefill == 6.0
    assert trend.budget_needs(needs(0.0), 1.0, 75.0, {}).prefill == 6.0  # no backlog: the needs as they are
