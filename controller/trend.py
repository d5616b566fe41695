"""Where the arrival rate is heading, for sizing an autoscaled fleet ahead of the load.

An added worker serves only after its start (a minute or more on GPUs), so a fleet sized for the rate of the last
window is sized for the past: on a rising load it is short by the time the worker serves, on a falling one it keeps
a worker it will no longer need. The controller therefore sizes its budget (ADD and REMOVE, never a move between the
pools) for the rate projected one lead ahead:

    slope     = least-squares slope of the ticks' rates over the last TREND_SPAN_S
    lead      = start_s + window_s / 2                       start_s: how long the last add took to serve;
                                                             the window's rate is the rate half a window ago
    growth    = clamp((rate_now + slope * lead) / rate_now, GROWTH_RANGE)

`growth` multiplies both pools' needs for the budget only. For an add, a prefill backlog that the pool as it is
clears within the lead does not count either (`budget_needs`): the worker it would call for serves after it.

The slope is fitted over TREND_SPAN_S, not taken between two ticks: a window's arrival count is Poisson, and over two
minutes the noise in the slope is a few times smaller than a daily swing's. A burst raises the slope too; the clamp
keeps that from adding more than GROWTH_RANGE allows, and the queue terms already carry a burst. Samples start one
window after traffic begins (before that the window is not yet full, and its rate reads low).

Until an add has been seen to serve, start_s is 0 and only the half window is looked ahead. An add the cluster
refused or could not place (the fleet did not grow by the time nothing is in transition) teaches nothing.
"""

from __future__ import annotations

import dataclasses
import math

from pdserve.controller.config import ControllerState
from pdserve.controller.decision import Action
from pdserve.controller.demand import PoolNeeds
from pdserve.controller.observation import Observation

TREND_SPAN_S = 120.0
"""How far back the slope reaches: long enough that a window's Poisson noise is small beside a daily swing's slope,
short enough to turn with a ramp within a few minutes."""
GROWTH_RANGE = (0.8, 1.25)
"""Clamps of the projected growth: a trend is a guess, and the queue terms already carry a burst."""
START_ALPHA = 0.5
"""EMA weight of the newest observed start time."""


def record(state: ControllerState, obs: Observation) -> ControllerState:
    """The state with this tick's arrival rate sampled and, once an add has finished starting, its start time."""
    now = obs.now_s
    samples = tuple(s for s in state.rate_samples if now - s[0] <= TREND_SPAN_S)
    if obs.traffic.idle:
        samples = ()
    elif now - state.traffic_since_s >= obs.traffic.window_s:
        samples += ((now, obs.traffic.arrival_rate),)
    state = dataclasses.replace(state, rate_samples=samples)
    if math.isfinite(state.add_issued_s) and not obs.settling:
        if len(obs.workers) > state.add_from_workers:
            took = now - state.add_issued_s
            start = took if state.start_s <= 0 else (1 - START_ALPHA) * state.start_s + START_ALPHA * took
            state = dataclasses.replace(state, start_s=start)
        state = dataclasses.replace(state, add_issued_s=-math.inf)
    return state


def issued(state: ControllerState, action: Action, obs: Observation) -> ControllerState:
    """The state after a decision: an ADD starts the clock on its start time."""
    if action is Action.ADD:
        return dataclasses.replace(state, add_issued_s=obs.now_s, add_from_workers=len(obs.workers))
    return state


def lead_s(state: ControllerState, obs: Observation) -> float:
    """How far ahead the budget looks: the last add's start, and half the window (its rate is half a window old)."""
    return state.start_s + obs.traffic.window_s / 2


def budget_needs(needs: PoolNeeds, growth: float, lead: float, inputs: dict[str, float]) -> PoolNeeds:
    """The needs the budget is sized for: the needs times `growth`, except that a prefill backlog the pool clears
    before an added worker would serve (`lead`) does not count, nor does the TTFT tail it causes. A burst's queue is
    gone by the time the worker it called for serves, and that worker then waits out scale_down_cooldown_s (seen
    in `pdserve plan` on a daily day: a 25 s burst of 1.5x added four prefill workers that started after it)."""
    prefill = needs.prefill
    clear_s = needs.inputs.get("prefill_backlog_clear_s", 0.0)
    if 0 < clear_s < lead and needs.prefill > needs.prefill_steady:
        prefill = needs.prefill_steady
        inputs["budget_ignores_backlog"] = 1.0
    return dataclasses.replace(needs, prefill=prefill * growth, decode=needs.decode * growth)


def growth(state: ControllerState, obs: Observation, inputs: dict[str, float]) -> float:
    """The projected arrival rate one lead ahead over the rate now (1.0 when the trend is unknown)."""
    samples = state.rate_samples
    rate = obs.traffic.arrival_rate
    if len(samples) < 3 or rate <= 0 or samples[-1][0] - samples[0][0] < TREND_SPAN_S / 2:
        return 1.0
    slope = _fitted_slope(samples)
    lead = lead_s(state, obs)
    low, high = GROWTH_RANGE
    factor = min(max((rate + slope * lead) / rate, low), high)
    inputs.update({"rate_slope": slope, "trend_lead_s": lead, "trend_growth": factor})
    return factor


def describe(growth: float, inputs: dict[str, float]) -> str:
    """A decision reason's note on the projection, when it changed the needs ("" when it did not)."""
    if growth == 1.0:
        return ""
    return f" (at the rate {inputs.get('trend_lead_s', 0.0):.0f}s ahead, {growth:.2f}x the window's)"


def _fitted_slope(samples: tuple[tuple[float, float], ...]) -> float:
    """Least-squares slope of rate against time."""
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    return sum((t - mean_t) * (r - mean_r) for t, r in samples) / spread if spread > 0 else 0.0
