"""A shift in the mix: the traffic's prompts changed so much that the split should follow at once, without the
confirmation and cooldown that keep a burst or a noisy window from moving workers (see `controller`)."""

from __future__ import annotations

import math

from pdserve.controller.config import ControllerConfig, ControllerState
from pdserve.controller.demand import PoolNeeds
from pdserve.controller.observation import Observation
from pdserve.controller.split import OVERLOADED, best_split, evaluate


def mix_shifted(config: ControllerConfig, needs: PoolNeeds, state: ControllerState, obs: Observation,
                current: tuple[int, int], inputs: dict[str, float], warming: bool) -> bool:
    """The mix has changed (a phase shift), which waiting only makes worse: the averages alone overload the current
    split, the best split carries them `shift_ratio` times better, and either the arrivals' mean prompt differs
    by at least `shift_ratio` either way from when the split was last fitted (`fitted_input_tokens`; the finished
    requests' before that), or traffic has only just begun. A burst raises only the queue terms; a correction grown
    from an overload (a pool observed slower than modelled) changes the needs but not the mix, and must not flip
    the split."""
    arrived = obs.traffic.arrived_input_tokens
    fitted = state.fitted_input_tokens if state.fitted_input_tokens > 0 else obs.traffic.mean_input_tokens
    if math.isfinite(arrived) and arrived > 0 and fitted > 0:
        inputs["prompt_shift"] = max(arrived / fitted, fitted / arrived)
    if not warming and inputs.get("prompt_shift", 1.0) < config.shift_ratio:
        return False
    now = evaluate(needs.prefill_steady, needs.decode_steady, current)
    best = best_split(config, needs.prefill_steady, needs.decode_steady, sum(current), current)
    if best is None or not now.bottleneck > OVERLOADED:
        return False
    ratio = now.bottleneck / best.bottleneck if best.bottleneck > 0 else math.inf
    inputs["shift_ratio"] = ratio
    return ratio >= config.shift_ratio
