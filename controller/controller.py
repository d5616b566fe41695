"""The prefill:decode ratio controller: `tick(config, model, state, observation) -> Decision`, a pure function.

Reading Redis and moving Ray actors live in adapters around it, so the same `tick` runs live, in a dry run and in the
simulator. Every decision carries one sentence saying why, and `inputs`, every number it used.

The math, per tick (details in `demand`, `perf_model` and `split`):

    S        = prefill_seconds(ISL) * c_ttft                   u_p = largest rho with S + rho*S/(2(1-rho)) <= T
    need_p   = max(lambda*S / u_p,  lambda*S + backlog_work/T) * pressure_ttft
    B*       = largest B <= min(max_num_seqs, kv_tokens/ctx) with decode_step_seconds(B, ctx) * c_tpot <= tau
    need_d   = max(lambda*(OSL-1) / (B*/step(B*) * u_d),  held/(B*_held u_d),  D*kv_used/KV_HIGH_WATER) * p_tpot
               (B*_held: B* at the held requests' own context; the KV term only while a decode worker has a queue;
               the pressures only from a window with no move in it)
    (a move is judged by each need capped at N: a backlog no split could clear must not outweigh everything else)
    ISL, OSL = the arrivals' (prompt lengths as they arrive; outputs predicted from their length class)
    c_ttft, c_tpot <- EMA toward the factor that makes the predicted p50 equal the observed one, in [0.5, 4],
                      from settled windows only (no move, no long prefill queue within the last window or two)
    load     = need / workers;  bottleneck(P, D) = max(load_p, load_d)
    target   = the split of N with the lowest bottleneck          (N = active workers; see budget below)
    budget   : N+k when the best split of N is above target_load and N < max_workers, k the fewest workers that
               bring the best split to target_load or below (up to max_workers; at least 1);
               N-k when the best splits of N-1 down to N-k all stay at or below scale_down_load, k the most
               that do (down to min_workers; a falling load is shed in one decision, as a rising one is added);
               both judged at the needs times the rate's growth one worker start ahead (`trend`); an add not
               for a prefill backlog the pool clears within that lead (`trend.budget_needs`)
    act      : only if bottleneck(current) - bottleneck(target) >= min_gain (moves; adds likewise),
               the target was seen confirm_ticks ticks in a row (heading the same way; how far may vary), and
               cooldown_s has passed (both skipped when the mix has shifted: the arriving prompts' mean differs
               shift_ratio times either way from the one the split was last fitted to, and the averages alone load
               the current split shift_ratio times its best; and skipped for the first fit, all the way at once:
               a starting split never fitted to the traffic that the best split beats shift_ratio times);
               then up to max_moves workers at once (default 1): the least loaded (fewest running + waiting,
               then worker id) of the pool that shrinks; an add goes to the pool that grows.

Before any of that: while a worker is in transition (draining for a move, restarting, starting) the controller
holds, and the cooldown restarts, so moves happen one at a time (except that a shift in the mix may send more
workers the way the ones in transition are going, planned from the split they are heading to); a worker draining to
leave is not waited for (it takes no new requests, so the pools' loads already show the fleet without it, and the
scale-down cooldown counts from the remove); with `pin` set the target is the pin (clamped to the budget) and the
controller moves one worker per tick toward it without confirmation or cooldown; with no traffic (nothing arrived,
nothing finished), it holds; with no finished request to learn lengths from, it acts only on what needs no output
length (`estimate_early_needs`: the requests decode holds, a lower bound on its need, and the arriving prompts):
an add, or a move toward decode, and otherwise holds; in the first warmup_s of traffic
(the first requests to finish are the short ones, so lengths learned then are too short) it moves only for a shift
in the mix (below) or for the first fit (a starting split the best one beats shift_ratio times: the start was a
guess made without the traffic, so it goes all the way at once), and removes nothing; it does add, since lengths
read short make the need read low, so an add they call for is needed at least as much.

When even the averages alone overload the best split (its bottleneck > 1) and no worker can be added,
the queue terms are left out of the split: the queue then grows in whichever pool is shorter, so following it would
move a worker there, grow the queue in the other pool, and move it back. The averages alone decide, and the reason
says "overloaded". A burst is the other case: the averages fit, and the queue says where the extra work sits.

A burst shows in the queue terms (prefill backlog, decode queue, KV use) of the heartbeats, not in the averages: it
raises the need at once, but the controller moves only if the burst outlasts confirm_ticks ticks, because a move
takes a drain and a restart, and a queue that clears by itself before that would only be disturbed by it. A shift in
the mix (chat giving way to long documents) is the opposite: it shows in the averages at once (the arrivals' lengths)
and waiting only lets a backlog build that takes minutes to clear, so a shift by more than shift_ratio acts on the
tick that sees it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pdserve.controller import trend
from pdserve.controller.actions import act
from pdserve.controller.config import ControllerConfig, ControllerState
from pdserve.controller.decision import Action, Decision
from pdserve.controller.demand import (
    CORRECTION_MIN_FINISHED,
    PoolNeeds,
    estimate_early_needs,
    estimate_needs,
    update_corrections,
)
from pdserve.controller.mix_shift import mix_shifted
from pdserve.controller.observation import Observation, PoolRole
from pdserve.controller.perf_model import PerfModel
from pdserve.controller.split import OVERLOADED, Split, best_split, evaluate, gain, proportional_prefill


@dataclass(frozen=True)
class _Plan:
    """Where the traffic says to head, before hysteresis."""

    action: Action
    target: tuple[int, int]
    why: str


def tick(config: ControllerConfig, model: PerfModel, state: ControllerState, obs: Observation) -> Decision:
    """Decide this tick's action from the observation; pass `decision.state` to the next tick."""
    decision = _decide(config, model, trend.record(state, obs), obs)
    return dataclasses.replace(decision, state=trend.issued(decision.state, decision.action, obs))


def _decide(config: ControllerConfig, model: PerfModel, state: ControllerState, obs: Observation) -> Decision:
    current = obs.sizes
    state, inputs = update_corrections(config, model, state, obs)
    inputs.update({"now_s": obs.now_s, "current_prefill": float(current[0]), "current_decode": float(current[1]),
                   "ttft_correction": state.ttft_correction, "tpot_correction": state.tpot_correction})
    needs = None
    if not obs.traffic.idle and obs.traffic.has_lengths:
        needs = estimate_needs(config, model, state, obs)
        now_split = evaluate(needs.prefill, needs.decode, current)
        inputs.update(needs.inputs)
        inputs.update({"prefill_load": now_split.prefill_load, "decode_load": now_split.decode_load,
                       "bottleneck_now": now_split.bottleneck,
                       "proportional_prefill": proportional_prefill(config, needs.prefill, needs.decode,
                                                                    sum(current))})

    def hold(why: str, new_state: ControllerState, target: tuple[int, int] = current) -> Decision:
        return Decision(obs.now_s, Action.HOLD, current, target, reason=why, inputs=inputs, state=new_state)

    reset = dataclasses.replace(state, candidate=None, candidate_ticks=0)
    if obs.settling:
        names = ", ".join(sorted(w.worker_id for w in obs.settling))
        follow = _follow_shift(config, state, obs, needs, inputs, names)
        if follow is not None:
            return follow
        return hold(f"Hold at {current}: {names} in transition; one move at a time, and the "
                    f"{config.cooldown_s:g}s cooldown restarts.", dataclasses.replace(reset, last_move_s=obs.now_s))
    if config.pin is not None:
        return _pinned(config, state, obs, current, needs, inputs)
    if obs.traffic.idle:
        return hold(f"Hold at {current}: no traffic in the last {obs.traffic.window_s:g}s.",
                    dataclasses.replace(reset, traffic_since_s=math.inf))
    if math.isinf(state.traffic_since_s):
        state = reset = dataclasses.replace(state, traffic_since_s=obs.now_s)
    warming = obs.now_s - state.traffic_since_s
    if needs is None:
        unknown = (f"Hold at {current}: {obs.traffic.arrival_rate:.3g} req/s arrived but none finished in the last "
                   f"{obs.traffic.window_s:g}s, so the lengths are unknown.")
        needs = estimate_early_needs(config, model, state, obs)
        if needs is None:
            return hold(unknown, reset)
        inputs.update(needs.inputs)
        plan = _plan(config, needs, current, inputs)
        if not _acts_on_early_needs(plan, current):
            return hold(f"{unknown[:-1]}; decode holds {needs.inputs['decode_held']:.0f} requests, at least "
                        f"{needs.decode:.2f} workers' worth.", reset)
        plan = dataclasses.replace(plan, why=f"{plan.why}; no request has finished yet, so decode counts only the "
                                              f"requests it holds")
        shifted = first_fit = False
        early = True
    else:
        early = False
        shifted = mix_shifted(config, needs, state, obs, current, inputs, warming < config.warmup_s)
        plan = _plan(config, needs, current, inputs, trend.growth(state, obs, inputs), trend.lead_s(state, obs))
        first_fit = _first_fit(config, state, obs, plan, inputs)
    if plan.target == current:
        return hold(plan.why, _fitted(dataclasses.replace(state, candidate=None, candidate_ticks=0), obs))
    ticks = state.candidate_ticks + 1 if _same_way(state.candidate, plan.target, current) else 1
    state = dataclasses.replace(state, candidate=plan.target, candidate_ticks=ticks)
    inputs["candidate_ticks"] = float(ticks)
    shift = plan.action is Action.MOVE and (shifted or first_fit)
    if warming < config.warmup_s and not shift and not early and plan.action is not Action.ADD:
        return hold(f"{plan.why}; warming up ({warming:.0f}s of {config.warmup_s:g}s since traffic began: the first "
                    f"requests to finish are the short ones, so the lengths seen so far are too short), holding at "
                    f"{current} unless the mix is plainly wrong for it.", reset, plan.target)
    if first_fit:
        plan = dataclasses.replace(plan, why=f"{plan.why}; the first fit of the starting split to the traffic, so "
                                              f"no confirmation or cooldown, all the way at once")
    elif shift:
        plan = dataclasses.replace(plan, why=f"{plan.why}; the mix has shifted (the averages alone load {current} "
                                              f"{inputs['shift_ratio']:.2f}x its best split), so no confirmation "
                                              f"or cooldown")
    elif ticks < config.confirm_ticks:
        return hold(f"{plan.why}; seen {ticks} of {config.confirm_ticks} ticks, holding at {current} for now.", state,
                    plan.target)
    since = obs.now_s - state.last_move_s
    cooldown, name = ((config.scale_down_cooldown_s, "scale_down_cooldown_s") if plan.action is Action.REMOVE
                      else (config.cooldown_s, "cooldown"))
    if since < cooldown and not shift:
        return hold(f"{plan.why}; confirmed, but the last change was {since:.0f}s ago ({name} "
                    f"{cooldown:g}s), holding at {current} for now.", state, plan.target)
    return act(config, plan.action, plan.target, current, obs, needs, plan.why,
               _fitted(dataclasses.replace(state, last_move_s=obs.now_s), obs), inputs,
               max_moves=abs(plan.target[0] - current[0]) if first_fit else config.max_moves)


def _first_fit(config: ControllerConfig, state: ControllerState, obs: Observation, plan: _Plan,
               inputs: dict[str, float]) -> bool:
    """The starting split is plainly wrong for the traffic: it has never been fitted to it (it was the operator's
    guess), enough requests have finished to know their lengths, and the best split would carry the traffic
    shift_ratio times better. Then the controller goes all the way at once, without warm-up, confirmation or
    cooldown, as for a shift in the mix: from an even split a fleet that needed 13:2 lost the first minutes moving one
    worker per cooldown (the scenario family, BENCHMARKS.md). A start that is only a little off (a planned split the
    model ranks slightly below another) moves as usual, one worker at a time."""
    if (state.fitted_input_tokens > 0 or not math.isfinite(obs.traffic.arrived_input_tokens)
            or obs.traffic.finished < CORRECTION_MIN_FINISHED or plan.action is not Action.MOVE):
        return False
    best = inputs.get("bottleneck_target", math.inf)
    return inputs.get("bottleneck_current", 0.0) >= config.shift_ratio * best


def _follow_shift(config: ControllerConfig, state: ControllerState, obs: Observation, needs: PoolNeeds | None,
                  inputs: dict[str, float], names: str) -> Decision | None:
    """While workers are in transition the controller holds, except for a shift in the mix that calls for more
    workers the same way: then those move at once, planned from the split the pools are heading to. A shift
    seen on a window half old mix, half new, would otherwise wait out the first moves' drain and restart while the
    new mix's queue grows (seen in `pdserve plan`: chat -> summaries lost 25 s that way). None: hold as usual."""
    heading = obs.heading
    if config.pin is not None or needs is None or heading is None or obs.traffic.idle:
        return None
    joining = {w.joining for w in obs.settling}
    warming = obs.now_s - state.traffic_since_s < config.warmup_s
    if len(joining) != 1 or not mix_shifted(config, needs, state, obs, heading, inputs, warming):
        return None
    plan = _plan(config, needs, heading, inputs)
    grows = PoolRole.PREFILL if plan.target[0] > heading[0] else PoolRole.DECODE
    if plan.action is not Action.MOVE or joining != {grows}:
        return None
    state = _fitted(dataclasses.replace(state, last_move_s=obs.now_s, candidate=None, candidate_ticks=0), obs)
    return act(config, Action.MOVE, plan.target, heading, obs, needs,
               f"{plan.why}; the mix has shifted (the averages alone load {heading}, where the pools are heading "
               f"with {names} in transition, {inputs['shift_ratio']:.2f}x its best split), so more go the same way "
               f"now", state, inputs)


def _acts_on_early_needs(plan: _Plan, current: tuple[int, int]) -> bool:
    """Before any request finishes, decode's need is a lower bound (the requests it holds: `estimate_early_needs`)
    and prefill's is as good as ever (the prompts' lengths are known on arrival). So an add, or a move toward decode,
    may go on it: decode needs at least that much. A move away from decode, or a remove, may not. The warm-up does
    not hold these back: it guards against the first answers' short lengths, and these use none."""
    return plan.action is Action.ADD or (plan.action is Action.MOVE and plan.target[1] > current[1])


def _fitted(state: ControllerState, obs: Observation) -> ControllerState:
    """The state with the split now fitted to the arrivals' prompt length (0 when that is unknown)."""
    arrived = obs.traffic.arrived_input_tokens
    return dataclasses.replace(state, fitted_input_tokens=arrived if math.isfinite(arrived) else 0.0)


def _same_way(candidate: tuple[int, int] | None, target: tuple[int, int], current: tuple[int, int]) -> bool:
    """The target heads the same way from current as the last tick's candidate: the fleet and each pool grow, stay
    or shrink in both, and unless both add, to the same number of workers. How far an add goes may vary from tick
    to tick with the queues: on a rising load each tick asks for more workers than the last (until 2026-12-06 an
    add had to ask for the same total twice, and live the morning's ramp asked for 6, 7, 8, 9, 8, 9, 10 workers
    while the add waited 21 s and attainment fell to 13%). A remove still needs the same total twice: scale-down
    may wait (confirming removes of any size flapped on the planner's 70B day: 16 adds and 15 removes, not 10/9)."""
    if candidate is None or _direction(candidate, current) != _direction(target, current):
        return False
    return sum(target) > sum(current) or sum(candidate) == sum(target)


def _direction(target: tuple[int, int], current: tuple[int, int]) -> tuple[int, int, int]:
    """The signs of the change in (all workers, prefill, decode) from current to target."""
    def sign(change: int) -> int:
        return (change > 0) - (change < 0)
    return sign(sum(target) - sum(current)), sign(target[0] - current[0]), sign(target[1] - current[1])


def _traffic(needs: PoolNeeds) -> str:
    i = needs.inputs
    text = (f"at {i['arrival_rate']:.3g} req/s (ISL {i['isl']:.0f}, OSL {i['osl']:.0f}) the pools need "
            f"{needs.prefill:.2f} prefill and {needs.decode:.2f} decode workers")
    queue_terms = []
    if i["prefill_need_backlog"] > i["prefill_need_steady"]:
        queue_terms.append(f"{i['prefill_backlog_tokens']:.0f} prompt tokens queued")
    if max(i["decode_need_queue"], i["decode_need_kv"]) > i["decode_need_steady"]:
        queue_terms.append(f"{i['decode_held']:.0f} requests held on decode, KV {i['kv_used_fraction']:.0%} used")
    for name in ("ttft", "tpot"):
        pressure, p90 = i[f"{name}_pressure"], i[f"{name}_p90_s"]
        if pressure > 1:
            queue_terms.append(f"{name.upper()} p90 {p90:.3g}s over its SLO, need x{pressure:.2f}")
    if queue_terms:
        text += " (" + "; ".join(queue_terms) + ")"
    return text + "".join(f"; {note}" for note in needs.notes)


def _describe(split: Split) -> str:
    return f"{split.sizes} (loads {split.prefill_load:.2f}/{split.decode_load:.2f})"


def _plan(config: ControllerConfig, needs: PoolNeeds, current: tuple[int, int], inputs: dict[str, float],
          growth: float = 1.0, lead: float = 0.0) -> _Plan:
    """The target before hysteresis: add or remove within the budget (sized for the needs times `growth`, the
    trend one start ahead; an add not for a backlog the pool clears within `lead`: `trend.budget_needs`), else the
    best split of the current workers."""
    total = sum(current)
    now = evaluate(needs.prefill, needs.decode, current)
    ahead = dataclasses.replace(needs, prefill=needs.prefill * growth, decode=needs.decode * growth)
    growing = trend.budget_needs(needs, growth, lead, inputs)
    best = best_split(config, growing.prefill, growing.decode, total, current)
    traffic = _traffic(needs)
    if best is not None:
        inputs.update({"best_prefill": float(best.prefill), "best_decode": float(best.decode),
                       "bottleneck_best": best.bottleneck})

    if config.max_workers is not None and total < config.max_workers:
        bigger = _grown(config, growing, total, current)
        over = best is None or best.bottleneck > config.target_load
        if bigger is not None and over and (best is None or gain(best, bigger) >= config.min_gain):
            inputs["bottleneck_target"] = bigger.bottleneck
            added = bigger.total - total
            return _Plan(Action.ADD, bigger.sizes, f"Add {added} worker{'s' if added > 1 else ''}: {traffic}; the "
                         f"best split of {total} is loaded {best.bottleneck if best else math.inf:.2f} > "
                         f"target_load {config.target_load:g}{trend.describe(growth, inputs)}, {bigger.total} as "
                         f"{_describe(bigger)} (budget {config.max_workers})")
    if config.min_workers is not None and total > config.min_workers:
        smaller = _shrunk(config, ahead, total, current)
        if smaller is not None:
            inputs["bottleneck_target"] = smaller.bottleneck
            removed = total - smaller.total
            return _Plan(Action.REMOVE, smaller.sizes, f"Remove {_workers(removed)}: {traffic}; {smaller.total} "
                         f"workers as {_describe(smaller)} stay at or below {config.scale_down_load:g}"
                         f"{trend.describe(growth, inputs)} (floor {config.min_workers})")
    if best is None:
        return _Plan(Action.HOLD, current, f"Hold at {current}: {traffic}; {total} workers cannot hold "
                     f"{config.min_prefill}-{config.max_prefill or total} prefill and "
                     f"{config.min_decode}-{config.max_decode or total} decode")
    # A move is judged by needs capped at the cluster: a backlog no split could clear within the horizon would
    # otherwise need dozens of workers, outweigh any load on the other pool and take its last spare worker (seen
    # in `pdserve plan` at chat -> summaries: the one decode worker left failed TPOT for every request while the
    # prompt backlog cleared).
    need_p, need_d = min(needs.prefill, total), min(needs.decode, total)
    now, best = evaluate(need_p, need_d, current), best_split(config, need_p, need_d, total, current)
    inputs.update({"best_prefill": float(best.prefill), "best_decode": float(best.decode),
                   "bottleneck_best": best.bottleneck})
    steady = best_split(config, needs.prefill_steady, needs.decode_steady, total, current)
    inputs["bottleneck_best_steady"] = steady.bottleneck
    if steady.bottleneck > OVERLOADED:
        # Overloaded on average: the queues grow wherever the load lands, so they would only chase each other.
        # Split by the averages, and say so.
        traffic = (f"overloaded on average ({total} workers, the best split is loaded {steady.bottleneck:.2f} by the "
                   f"averages alone: {needs.prefill_steady:.2f} prefill and {needs.decode_steady:.2f} decode), so "
                   f"split by the averages; {traffic}")
        best, now = steady, evaluate(needs.prefill_steady, needs.decode_steady, current)
        inputs.update({"overloaded": 1.0, "best_prefill": float(best.prefill), "best_decode": float(best.decode),
                       "bottleneck_best": best.bottleneck})
    inputs["bottleneck_target"] = best.bottleneck
    if best.sizes == current:
        return _Plan(Action.HOLD, current, f"Hold at {current}: {traffic}; this is the best split "
                     f"(loads {now.prefill_load:.2f}/{now.decode_load:.2f}).")
    step = gain(now, best)
    inputs["gain"] = step
    inputs["bottleneck_current"] = now.bottleneck
    if step < config.min_gain:
        return _Plan(Action.HOLD, current, f"Hold at {current}: {traffic}; the best split {best.sizes} would lower "
                     f"the bottleneck only from {now.bottleneck:.2f} to {best.bottleneck:.2f} "
                     f"(< min_gain {config.min_gain:g}).")
    return _Plan(Action.MOVE, best.sizes, f"Rebalance toward {_describe(best)} from {_describe(now)}: {traffic}")


def _grown(config: ControllerConfig, needs: PoolNeeds, total: int, current: tuple[int, int]) -> Split | None:
    """The best split of the fewest workers above `total` (up to max_workers) loaded at most target_load, or of
    max_workers if none is; None when no larger split fits the per-pool bounds."""
    grown = None
    for size in range(total + 1, config.max_workers + 1):
        grown = best_split(config, needs.prefill, needs.decode, size, current) or grown
        if grown is not None and grown.bottleneck <= config.target_load:
            break
    return grown


def _shrunk(config: ControllerConfig, needs: PoolNeeds, total: int, current: tuple[int, int]) -> Split | None:
    """The best split of the fewest workers below `total` (down to min_workers) loaded at most scale_down_load,
    every size between staying at or below it too; None if `total` - 1 is loaded above it."""
    shrunk = None
    for size in range(total - 1, config.min_workers - 1, -1):
        split = best_split(config, needs.prefill, needs.decode, size, current)
        if split is None or split.bottleneck > config.scale_down_load:
            break
        shrunk = split
    return shrunk


def _workers(count: int) -> str:
    return "a worker" if count == 1 else f"{count} workers"


def _pinned(config: ControllerConfig, state: ControllerState, obs: Observation, current: tuple[int, int],
            needs: PoolNeeds | None, inputs: dict[str, float]) -> Decision:
    """Head for the operator's pin, one worker per tick, clamped to the budget."""
    pin_p, pin_d = config.pin
    total = sum(current)
    low = config.min_workers if config.min_workers is not None else total
    high = config.max_workers if config.max_workers is not None else total
    goal = min(max(pin_p + pin_d, min(low, total)), max(high, total))
    allowed = config.prefill_range(goal) or range(config.min_prefill, goal - config.min_decode + 1)
    prefill = min(max(pin_p, allowed.start), allowed.stop - 1)
    target = (prefill, goal - prefill)
    why = f"Pinned at {config.pin}"
    if target != config.pin:
        why += f" (the budget allows {goal} workers, so heading for {target})"
    state = dataclasses.replace(state, candidate=None, candidate_ticks=0)
    if target == current:
        return Decision(obs.now_s, Action.HOLD, current, target, reason=f"{why}: holding at {current}.",
                        inputs=inputs, state=state)
    action = Action.ADD if goal > total else Action.REMOVE if goal < total else Action.MOVE
    return act(config, action, target, current, obs, needs, why, dataclasses.replace(state, last_move_s=obs.now_s),
               inputs)
