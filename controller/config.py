"""The ratio controller's knobs (`ControllerConfig`) and what it carries from one tick to the next
(`ControllerState`). Both are frozen: `tick` returns a new state inside its `Decision`.

A bad value raises `ControllerConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


class ControllerConfigError(ValueError):
    """A controller setting is wrong; the message names the field."""


@dataclass(frozen=True)
class ControllerConfig:
    """How the controller sizes the prefill and decode pools.

    Eleven fields are the deployment's facts (the SLOs, the worker bounds, the pin, a decode worker's KV capacity and
    batch cap); the other ten are the controller's own settings, each with the reason for its default. The model's
    constants (planned utilisations, pressure, corrections) are in `demand.py`: the scenario family gave no reason to
    tune them per deployment (BENCHMARKS.md, "The controller on a family of scenarios")."""

    slo_ttft_s: float
    """Time-to-first-token target, seconds."""
    slo_tpot_s: float
    """Time-per-output-token target, seconds."""
    interval_s: float = 5.0
    """How often the adapter ticks: the heartbeats come every second or two and a move takes seconds to drain, so
    a tick in between reads fresh queues without deciding on every heartbeat."""
    cooldown_s: float = 15.0
    """No move, add or remove within this long after the last one started, or after a worker was last seen in
    transition (so it counts from when the move completed): the queues must first show the new split. The
    corrections learn only from settled windows, so this need not wait for the traffic window to refill. (The
    scenario family, with max_moves 2: 30 s -> 15 s raised the median from the even split 0.965 -> 0.990 on the
    tuning half and 1.000 -> 1.032 held out; phases last 80-200 s, and a shift needing three workers took one
    cooldown each.)"""
    max_moves: int = 2
    """Most workers one decision moves; they drain in parallel, and the controller holds until all have switched.
    More than one lets a large shift in the mix be followed in one step instead of one cooldown per worker. (The
    scenario family: 2 with the 15 s cooldown as above; 3 no better.)"""
    confirm_ticks: int = 2
    """A new target must be the target this many ticks in a row before the controller acts (hysteresis): a burst
    shorter than that clears by itself sooner than a drain and a switch would help. Ticks count as one target when
    they head the same way (`controller._same_way`): a move or an add may vary in how far it goes."""
    min_gain: float = 0.05
    """Move only when the predicted bottleneck load falls by at least this much: a smaller gain is within the
    model's error, and a move costs a drain. (The scenario family: 0.15 kept planned splits a little better and
    left bad starts worse.)"""
    warmup_s: float = 60.0
    """In the first this many seconds of traffic (after a start or an idle spell) move only for a shift in the mix
    or the first fit (see shift_ratio): the first requests to finish are the short ones, so the lengths learned
    then are biased, and only a plainly wrong split is worth a move on them. Removes wait too; adds do not (lengths
    read short make the need read low, so an add is needed at least as much as it seems)."""
    shift_ratio: float = 1.5
    """A shift in the mix skips confirm_ticks and the cooldown: when the averages alone (no queue term) overload the
    current split and the best split carries them with a bottleneck at least this many times lower. A burst shows
    in the queue terms only, so it still waits. The same ratio makes the first fit: a starting split (never fitted
    to the traffic) that the best split beats this many times goes all the way at once. math.inf: never skip."""
    min_prefill: int = 1
    min_decode: int = 1
    max_prefill: int | None = None
    """Most prefill workers the controller plans for (moves and adds); None: no bound but the total."""
    max_decode: int | None = None
    """Most decode workers the controller plans for; None: no bound but the total."""
    max_workers: int | None = None
    """Budget: the controller may add workers up to this many. None: it never adds."""
    min_workers: int | None = None
    """The controller may remove workers down to this many. None: it never removes."""
    pin: tuple[int, int] | None = None
    """Operator pin (prefill, decode): the target whatever the traffic; the controller only moves towards it."""
    kv_capacity_tokens: int = 0
    """KV cache capacity of one decode worker, in tokens; 0 = unlimited."""
    max_num_seqs: int = 256
    """Decode batch cap per worker."""
    target_load: float = 0.95
    """An autoscaled fleet's load: when the best split of the workers there are is loaded above this (and
    max_workers allows), the controller adds as many workers as bring the best split to it or below, in one
    decision. The load is judged at the arrival rate projected one worker start ahead (`trend`), so the margin here
    is only for the projection's error and for what no trend foresees (a burst): at 0.8 without the projection the
    fleet kept its margin for a rising load, and at 0.95 without it a morning ramp fell behind (`pdserve plan`, the
    daily trace: 87.9% attainment; with it 95.8%, BENCHMARKS.md "Autoscaling"). Sized in one step because adding one
    worker per cooldown and start fell minutes behind a morning ramp."""
    scale_down_load: float = 0.85
    """Remove workers (within min_workers) when the best split of one worker fewer keeps both pools at or below
    this, at the projected rate; as many as keep it so, in one decision (one per scale_down_cooldown_s trailed the
    live daily run's afternoon fall by 2-3 workers). Below target_load, so that a removal does not call for an add
    on the next rise, but not far below (the fleet may run target_load / scale_down_load times larger than it needs,
    1.12 here: at 0.6 / 0.8 the live daily run kept 12 workers through an afternoon that needed 9);
    scale_down_cooldown_s keeps removals apart."""
    scale_down_cooldown_s: float = 120.0
    """No remove within this long of the last move, add or remove (the cooldown for adds and moves is cooldown_s).
    Scaling down waits longer than scaling up: a worker removed too early costs a start (minutes on a GPU node that
    Ray must bring up) when the load comes back, while one kept too long costs only its idle time."""

    def __post_init__(self) -> None:
        positive = ("slo_ttft_s", "slo_tpot_s", "interval_s", "target_load")
        if not (isinstance(self.shift_ratio, (int, float)) and self.shift_ratio >= 1):
            raise ControllerConfigError(f"shift_ratio: must be a number >= 1 (inf: never), got {self.shift_ratio!r}")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ControllerConfigError(f"{name}: must be a positive number, got {value!r}")
        for name in ("cooldown_s", "scale_down_cooldown_s", "warmup_s", "min_gain", "scale_down_load"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ControllerConfigError(f"{name}: must be a number >= 0, got {value!r}")
        counts = ("max_moves", "confirm_ticks", "min_prefill", "min_decode", "max_num_seqs")
        for name in counts:
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ControllerConfigError(f"{name}: must be an integer >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.kv_capacity_tokens, int) and self.kv_capacity_tokens >= 0):
            raise ControllerConfigError(f"kv_capacity_tokens: must be an integer >= 0, got {self.kv_capacity_tokens!r}")
        if self.scale_down_load >= self.target_load:
            raise ControllerConfigError("scale_down_load: must be below target_load (or the pool size flaps)")
        smallest = self.min_prefill + self.min_decode
        for name in ("max_workers", "min_workers"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= smallest):
                raise ControllerConfigError(f"{name}: must be an integer >= min_prefill + min_decode ({smallest}), "
                                            f"got {value!r}")
        for name, low in (("max_prefill", self.min_prefill), ("max_decode", self.min_decode)):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= low):
                raise ControllerConfigError(f"{name}: must be an integer >= min_{name[4:]} ({low}), got {value!r}")
        if self.max_workers is not None and self.min_workers is not None and self.min_workers > self.max_workers:
            raise ControllerConfigError("min_workers: must not exceed max_workers")
        if self.pin is not None:
            if not (isinstance(self.pin, tuple) and len(self.pin) == 2 and all(isinstance(n, int) for n in self.pin)):
                raise ControllerConfigError(f"pin: must be a (prefill, decode) pair of integers, got {self.pin!r}")
            if self.pin[0] < self.min_prefill or self.pin[1] < self.min_decode:
                raise ControllerConfigError(f"pin: {self.pin} is below (min_prefill, min_decode) = "
                                            f"({self.min_prefill}, {self.min_decode})")

    def prefill_range(self, total: int) -> range:
        """The prefill pool sizes a split of `total` workers may have within the per-pool bounds (empty: none)."""
        low = self.min_prefill if self.max_decode is None else max(self.min_prefill, total - self.max_decode)
        high = total - self.min_decode if self.max_prefill is None else min(total - self.min_decode, self.max_prefill)
        return range(low, high + 1)

    def replace(self, **changes: object) -> ControllerConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ControllerState:
    """Carried from tick to tick; start with `ControllerState()`."""

    last_move_s: float = -math.inf
    """When the last move/add/remove was issued, or a worker was last seen in transition."""
    candidate: tuple[int, int] | None = None
    """The (prefill, decode) target seen on the last ticks, not yet acted on."""
    candidate_ticks: int = 0
    """How many ticks in a row `candidate` has been the target."""
    ttft_correction: float = 1.0
    """Observed / predicted TTFT p50, smoothed and clamped: multiplies the predicted prefill time."""
    tpot_correction: float = 1.0
    """Observed / predicted TPOT p50, smoothed and clamped: multiplies the predicted decode step time."""
    backlog_seen_s: float = -math.inf
    """When the prefill queue was last seen long (over the TTFT SLO's worth of work per worker)."""
    traffic_since_s: float = math.inf
    """When traffic began (after the cluster started or after an idle window); inf while idle."""
    output_by_class: tuple[float, ...] = ()
    """Learned mean output tokens per prompt-length class (0: not seen yet); see `output_lengths`."""
    rate_samples: tuple[tuple[float, float], ...] = ()
    """(now_s, arrival rate) of the recent ticks, for the rate's trend (`trend`)."""
    pool_samples: tuple[tuple[float, int, int], ...] = ()
    """(now_s, active prefill workers, active decode workers) of the ticks within the traffic window: the pools the
    window's requests ran under, for the TTFT correction (`demand.update_corrections`)."""
    add_issued_s: float = -math.inf
    """When the last ADD was issued, until no worker is in transition any more (-inf: none pending)."""
    add_from_workers: int = 0
    """How many workers the fleet had when the last ADD was issued: an add counts as a start only if the fleet grew
    (one the cluster refused, or could not place, teaches nothing)."""
    start_s: float = 0.0
    """How long an add takes to serve, as last observed (smoothed); 0 until an add has been seen to serve."""
    fitted_input_tokens: float = 0.0
    """The arrivals' mean prompt when the split was last fitted to the traffic (a move, or a hold that found the
    split good enough); a shift in the mix is measured from it. 0: not yet (or the arrivals' prompts unknown)."""
