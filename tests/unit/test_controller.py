"""The ratio controller on synthetic observations: a made-up linear perf model, and a tiny world that turns a
(prefill, decode) split and a traffic mix into the heartbeats and latencies an adapter would report (M/D/1 queueing
on prefill, Little's law on decode), optionally jittered by a seeded RNG."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from pdserve.controller import (
    Action,
    ControllerConfig,
    ControllerConfigError,
    ControllerState,
    Decision,
    Move,
    Observation,
    PoolRole,
    TrafficWindow,
    WorkerObservation,
    tick,
    update_corrections,
)
from pdserve.controller.controller import _same_way
from pdserve.controller.demand import CORRECTION_RANGE, MAX_PRESSURE
from pdserve.controller.output_lengths import NUM_CLASSES, class_counts, prompt_class
from pdserve.controller.perf_model import decode_capacity, md1_wait, prefill_max_utilisation
from pdserve.controller.split import evaluate

CHAT = (40.0, 200, 400)  # rate, ISL, OSL: short prompts, long answers
SUMMARY = (10.0, 2000, 50)  # long prompts, short answers
KV_TOKENS = 20_000
BLOCK = 16


class FakeModel:
    def prefill_seconds(self, prompt_tokens: int) -> float:
        return 1e-4 * prompt_tokens + 0.01

    def decode_step_seconds(self, batch: int, context_len: int) -> float:
        return 0.005 + 1e-5 * batch + 2e-8 * batch * context_len


MODEL = FakeModel()


def make_config(**changes: object) -> ControllerConfig:
    # warmup_s: the fake world is steady from its first tick. One worker a move and a 30 s cooldown (the defaults
    # until 2026-12-07) keep each move of these tests' stories visible on its own; max_moves has tests of its own.
    values: dict = {"slo_ttft_s": 0.5, "slo_tpot_s": 0.02, "kv_capacity_tokens": KV_TOKENS, "warmup_s": 0.0,
                    "max_moves": 1, "cooldown_s": 30.0}
    values.update(changes)
    return ControllerConfig(**values)


class World:
    """Workers with roles, steady-state load for the traffic, and moves applied at once (no drain time)."""

    def __init__(self, prefill: int, decode: int, traffic: tuple[float, int, int], *, jitter: float = 0.0,
                 seed: int = 0, truth: tuple[float, float] = (1.0, 1.0), finished: int = 200) -> None:
        self.roles = {f"w{i:02d}": PoolRole.PREFILL if i < prefill else PoolRole.DECODE
                      for i in range(prefill + decode)}
        self.traffic, self.jitter, self.truth, self.finished = traffic, jitter, truth, finished
        self.rng = random.Random(seed)
        self.now = 0.0
        self.extra_queue_tokens = 0
        self.next_id = prefill + decode
        self.finished_isl = traffic[1]  # the finished requests' mean prompt: the arrivals' of one tick ago

    def sizes(self) -> tuple[int, int]:
        roles = list(self.roles.values())
        return roles.count(PoolRole.PREFILL), roles.count(PoolRole.DECODE)

    def _noise(self) -> float:
        return 1.0 + self.rng.uniform(-self.jitter, self.jitter)

    def observe(self) -> Observation:
        rate, isl, osl = self.traffic
        prefill, decode = self.sizes()
        # Prefill: M/D/1 per worker; overloaded, a queue of two seconds of arrivals.
        service = MODEL.prefill_seconds(isl) * self.truth[0]
        rho = rate * service / max(prefill, 1)
        if rho < 1:
            wait = md1_wait(rho, service)
            ttft50, ttft90 = service + wait, service + 2.5 * wait
            queued = rho * rho / (2 * (1 - rho)) * isl
        else:
            ttft50, ttft90 = service + 2.0, service + 4.0
            queued = 2 * rate * isl / max(prefill, 1)
        # Decode: per-worker batch from Little's law, capped by KV memory.
        ctx = isl + osl // 2
        cap = min(256, int(0.9 * KV_TOKENS / ctx))
        batch = 1.0
        for _ in range(50):
            batch = rate / max(decode, 1) * (osl - 1) * MODEL.decode_step_seconds(round(batch), ctx) * self.truth[1]
        running, waiting = min(round(batch), cap), max(round(batch) - cap, 0)
        tpot = MODEL.decode_step_seconds(max(running, 1), ctx) * self.truth[1]
        workers = []
        for worker_id, role in sorted(self.roles.items()):
            if role is PoolRole.PREFILL:
                tokens = round(queued) + self.extra_queue_tokens // max(prefill, 1)
                workers.append(WorkerObservation(worker_id, role, False, running=1, waiting=round(tokens / isl),
                                                 queued_prefill_tokens=tokens))
            else:
                workers.append(WorkerObservation(worker_id, role, False, running=running, waiting=waiting,
                                                 kv_blocks_used=running * ctx // BLOCK,
                                                 kv_blocks_total=KV_TOKENS // BLOCK))
        n = self._noise
        finished_isl, self.finished_isl = self.finished_isl, isl
        window = TrafficWindow(window_s=30.0, arrival_rate=rate * n(), finished=self.finished,
                               mean_input_tokens=finished_isl, mean_output_tokens=osl, arrived_input_tokens=isl,
                               ttft_p50_s=ttft50 * n(), ttft_p90_s=ttft90 * n(),
                               tpot_p50_s=tpot * n(), tpot_p90_s=1.2 * tpot * n(), attainment=1.0,
                               finished_by_class=tuple((self.finished, float(osl)) if c == prompt_class(isl)
                                                       else (0, math.nan) for c in range(NUM_CLASSES)))
        return Observation(self.now, tuple(workers), window)

    def apply(self, decision: Decision) -> None:
        for move in decision.moves:
            self.roles[move.worker_id] = move.to_role
        for role in decision.add:
            self.roles[f"w{self.next_id:02d}"] = role
            self.next_id += 1
        for worker_id in decision.remove:
            del self.roles[worker_id]

    def run(self, config: ControllerConfig, ticks: int, state: ControllerState | None = None
            ) -> tuple[list[Decision], ControllerState]:
        # A split already fitted to the traffic, unless told otherwise: the first fit has its own tests.
        decisions, state = [], state or ControllerState(fitted_input_tokens=self.traffic[1])
        for _ in range(ticks):
            decision = tick(config, MODEL, state, self.observe())
            decisions.append(decision)
            state = decision.state
            self.apply(decision)
            self.now += config.interval_s
        return decisions, state


def acted(decisions: list[Decision]) -> list[Decision]:
    return [d for d in decisions if d.action is not Action.HOLD]


def best_sizes(decision: Decision, total: int) -> tuple[int, int]:
    """The split of `total` with the lowest bottleneck, from the needs the decision reported."""
    need_p, need_d = decision.inputs["prefill_need"], decision.inputs["decode_need"]
    return min(((p, total - p) for p in range(1, total)),
               key=lambda s: evaluate(need_p, need_d, s).bottleneck)


# --- the capacity math -------------------------------------------------------------------------------------------


def test_prefill_utilisation_meets_the_ttft_slo_exactly_between_floor_and_cap() -> None:
    service, slo = 0.21, 0.5
    rho, reachable = prefill_max_utilisation(service, slo, floor=0.1, cap=0.99)
    assert reachable
    assert service + md1_wait(rho, service) == pytest.approx(slo)
    assert prefill_max_utilisation(0.6, slo, floor=0.5, cap=0.9) == (0.5, False)  # prompt alone over the SLO
    assert prefill_max_utilisation(0.001, slo, floor=0.5, cap=0.9) == (0.9, True)


def test_decode_batch_is_the_largest_that_meets_the_tpot_slo() -> None:
    capacity = decode_capacity(MODEL, context_len=400, batch_cap=10_000, slo_tpot_s=0.01, correction=1.5)
    assert MODEL.decode_step_seconds(capacity.batch, 400) * 1.5 <= 0.01
    assert MODEL.decode_step_seconds(capacity.batch + 1, 400) * 1.5 > 0.01
    assert capacity.tokens_per_s == pytest.approx(capacity.batch / capacity.step_s)
    assert decode_capacity(MODEL, 400, batch_cap=45, slo_tpot_s=0.02, correction=1.0).batch == 45
    assert not decode_capacity(MODEL, 400, batch_cap=45, slo_tpot_s=0.001, correction=1.0).slo_reachable


# --- steady traffic, shifts, bursts -------------------------------------------------------------------------------


def test_steady_noisy_traffic_converges_then_holds_without_flapping() -> None:
    config = make_config()
    world = World(4, 2, CHAT, jitter=0.15, seed=7)
    converge, state = world.run(config, 40)
    assert world.sizes() == best_sizes(converge[-1], 6) == (2, 4)
    assert all(len(d.moves) <= 1 for d in converge)
    settled, _ = world.run(config, 50, state)
    assert len(acted(settled)) <= 1
    assert world.sizes() == (2, 4)
    last = settled[-1]
    assert last.action is Action.HOLD and last.current == last.target == (2, 4)
    assert "req/s" in last.reason and "(2, 4)" in last.reason


def test_the_first_fit_goes_all_the_way_at_once_when_the_start_is_plainly_wrong() -> None:
    # 1:5 under summaries (long prompts, short answers): the best split carries them many times better, so the first
    # tick with lengths moves every worker it takes at once, warm-up, confirmation and max_moves notwithstanding.
    config = make_config(warmup_s=60.0)
    world = World(1, 5, SUMMARY)
    decisions, _ = world.run(config, 6, ControllerState())
    first = decisions[0]
    assert first.action is Action.MOVE and "first fit" in first.reason
    assert len(first.moves) == first.target[0] - 1 > 1 and world.sizes() == first.target
    assert not acted(decisions[1:])
    # Fitted once, it is not the first fit again: later moves are one at a time, after confirmation.
    world.traffic = CHAT
    later, _ = world.run(config, 12, decisions[-1].state)
    assert acted(later) and all(len(d.moves) == 1 and "first fit" not in d.reason for d in acted(later))


def test_a_start_that_is_only_a_little_off_is_not_a_first_fit() -> None:
    # One worker off the best split is not shift_ratio times worse: the usual confirmation applies.
    config = make_config(warmup_s=0.0)
    probe = tick(config, MODEL, ControllerState(fitted_input_tokens=200), World(3, 3, CHAT).observe())
    best = best_sizes(probe, 6)
    world = World(best[0] + 1, best[1] - 1, CHAT)
    decisions, _ = world.run(config, 4, ControllerState())
    assert all("first fit" not in d.reason for d in decisions)
    assert decisions[0].action is Action.HOLD


def test_a_backlog_no_split_could_clear_does_not_take_the_other_pools_last_spare_worker() -> None:
    # 4:2 under chat loads decode 1.2; a prompt backlog of 2M tokens would need hundreds of prefill workers to clear
    # within the TTFT SLO. Capped at the cluster (6), it no longer outweighs decode: taking a decode worker would
    # leave one decode worker loaded 2.3, worse than anything the backlog gains.
    config = make_config(confirm_ticks=1, cooldown_s=0.0)
    world = World(4, 2, CHAT)
    world.extra_queue_tokens = 2_000_000
    both = tick(config, MODEL, ControllerState(), world.observe())
    assert both.inputs["prefill_need"] > 100 and both.inputs["decode_load"] > 1
    assert both.inputs["best_prefill"] == 4 and both.inputs["bottleneck_best"] == pytest.approx(6 / 4)
    assert both.action is Action.HOLD and both.target == (4, 2)
    world.extra_queue_tokens = 0  # prefill has room again: decode, the overloaded pool, gets a worker
    relieved = tick(config, MODEL, ControllerState(), world.observe())
    assert relieved.action is Action.MOVE and relieved.moves[0].to_role is PoolRole.DECODE


def shift_to_summaries(config: ControllerConfig) -> tuple[World, float, list[Decision], list[Decision]]:
    """50 s of chat at (2, 4), then summaries for 200 s: (world, when the shift came, decisions after it, moves)."""
    world = World(2, 4, CHAT)
    before, state = world.run(config, 10)
    assert not acted(before)
    world.traffic = SUMMARY
    shift_at = world.now
    after, _ = world.run(config, 40, state)
    return world, shift_at, after, acted(after)


def test_shift_from_chat_to_summarisation_moves_one_at_a_time_toward_more_prefill() -> None:
    config = make_config(confirm_ticks=2, cooldown_s=30.0, interval_s=5.0, shift_ratio=math.inf)
    world, shift_at, after, moves = shift_to_summaries(config)
    assert [d.action for d in moves] == [Action.MOVE] * 3
    assert all(len(d.moves) == 1 and d.moves[0].to_role is PoolRole.PREFILL for d in moves)
    # confirm_ticks: the first move comes on the second tick that sees the new target, not the first.
    assert moves[0].now_s == shift_at + config.interval_s
    assert after[0].action is Action.HOLD and after[0].target != after[0].current
    assert "seen 1 of 2" in after[0].reason
    # cooldown between moves, one worker per move.
    gaps = [b.now_s - a.now_s for a, b in zip(moves, moves[1:])]
    assert all(gap >= config.cooldown_s for gap in gaps)
    assert [d.current for d in moves] == [(2, 4), (3, 3), (4, 2)]
    # converged to the split with the lowest bottleneck, and holds there.
    assert world.sizes() == (5, 1) == best_sizes(after[-1], 6)
    assert after[-1].action is Action.HOLD
    # the least loaded decode worker moved each time (decode workers are equally loaded: lowest id).
    assert moves[0].moves[0].worker_id == "w02"


def test_max_moves_follows_a_large_shift_in_one_decision() -> None:
    config = make_config(confirm_ticks=2, cooldown_s=30.0, interval_s=5.0, max_moves=4)
    world = World(2, 4, CHAT)
    _, state = world.run(config, 10)
    world.traffic = SUMMARY
    after, _ = world.run(config, 20, state)
    moves = acted(after)
    # the whole gap (2:4 -> 5:1) in one decision: three decode workers, least loaded first, all to prefill.
    assert len(moves) == 1 and moves[0].current == (2, 4) and moves[0].target == (5, 1)
    assert [m.worker_id for m in moves[0].moves] == ["w02", "w03", "w04"]
    assert all(m.to_role is PoolRole.PREFILL for m in moves[0].moves)
    assert "workers w02 (holding" in moves[0].reason
    assert world.sizes() == (5, 1)


def test_a_shift_in_the_mix_moves_at_once_without_confirmation_or_cooldown() -> None:
    """The averages alone overload (2, 4) under summaries by far more than shift_ratio: no reason to wait."""
    config = make_config(confirm_ticks=2, cooldown_s=30.0, interval_s=5.0)
    world, shift_at, after, moves = shift_to_summaries(config)
    assert moves[0].now_s == shift_at and "the mix has shifted" in moves[0].reason
    assert moves[0].inputs["shift_ratio"] >= config.shift_ratio
    assert world.sizes() == (5, 1) == best_sizes(after[-1], 6)
    assert after[-1].action is Action.HOLD

    # the same shift with the rule off: confirmation and cooldown before every move
    _, _, _, slow = shift_to_summaries(dataclasses.replace(config, shift_ratio=math.inf))
    assert slow[0].now_s > moves[0].now_s and slow[-1].now_s > moves[-1].now_s


def test_a_one_tick_burst_does_not_move_but_a_persistent_one_moves_one_worker_to_prefill() -> None:
    config = make_config()
    world = World(2, 4, CHAT)
    calm, state = world.run(config, 10)
    assert not acted(calm)
    assert calm[-1].inputs["prefill_need_backlog"] < calm[-1].inputs["prefill_need_steady"]

    # Same average rate, but 60k prompt tokens suddenly queued on the prefill workers (300 prompts).
    world.extra_queue_tokens = 60_000
    spike, state = world.run(config, 1, state)
    assert spike[0].action is Action.HOLD
    assert spike[0].target[0] > spike[0].current[0]  # the queue term points at prefill...
    assert spike[0].inputs["prefill_need_backlog"] > spike[0].inputs["prefill_need_steady"]
    assert "prompt tokens queued" in spike[0].reason
    world.extra_queue_tokens = 0  # ...but the queue cleared before it was confirmed: no move.
    cleared, state = world.run(config, 3, state)
    assert not acted(cleared) and world.sizes() == (2, 4)
    assert cleared[-1].state.candidate is None

    world.extra_queue_tokens = 60_000  # a burst that lasts: moves on its second tick.
    burst, state = world.run(config, 2, state)
    assert [d.action for d in burst] == [Action.HOLD, Action.MOVE]
    assert burst[1].moves[0].to_role is PoolRole.PREFILL
    assert world.sizes() == (3, 3)
    more, _ = world.run(config, 2, state)  # the cooldown stops a second move right away
    assert not acted(more)
    assert "cooldown" in more[-1].reason


def test_ttft_p90_over_the_slo_with_busy_prefill_raises_the_prefill_need() -> None:
    config = make_config()
    obs = World(2, 4, (58.0, 200, 400)).observe()
    calm = tick(config, MODEL, ControllerState(), obs)
    late = dataclasses.replace(obs.traffic, ttft_p90_s=0.9)
    pressed = tick(config, MODEL, ControllerState(), dataclasses.replace(obs, traffic=late))
    assert calm.inputs["ttft_pressure"] == 1.0
    assert pressed.inputs["ttft_pressure"] == pytest.approx(min(0.9 / 0.5, MAX_PRESSURE))
    assert pressed.inputs["prefill_need"] > calm.inputs["prefill_need"]
    assert pressed.inputs["decode_need"] == pytest.approx(calm.inputs["decode_need"])
    assert "TTFT p90 0.9s over its SLO" in pressed.reason
    # within a window of the last move the tail is the old split's: no pressure from it
    just_moved = ControllerState(last_move_s=obs.now_s - obs.traffic.window_s / 2)
    after_move = tick(config, MODEL, just_moved, dataclasses.replace(obs, traffic=late))
    assert after_move.inputs["ttft_pressure"] == 1.0


def test_arriving_prompt_lengths_size_prefill_before_the_finished_requests_catch_up() -> None:
    # Summaries have begun to arrive; only chat requests have finished so far. The prefill need follows the
    # arrivals' prompt length at once, and the decode need still uses the finished output lengths.
    config = make_config()
    obs = World(3, 3, (10.0, 200, 50)).observe()
    stale = tick(config, MODEL, ControllerState(), obs)
    arriving = dataclasses.replace(obs.traffic, arrived_input_tokens=2000.0)
    fresh = tick(config, MODEL, ControllerState(), dataclasses.replace(obs, traffic=arriving))
    assert stale.inputs["isl"] == 200 and fresh.inputs["isl"] == 2000 and fresh.inputs["finished_isl"] == 200
    assert fresh.inputs["prefill_need"] > 5 * stale.inputs["prefill_need"]
    assert fresh.inputs["osl"] == stale.inputs["osl"] == 50
    assert fresh.target[0] > stale.target[0]


def test_kv_near_full_and_queued_decode_requests_raise_the_decode_need() -> None:
    config = make_config()
    obs = World(2, 4, CHAT).observe()
    calm = tick(config, MODEL, ControllerState(), obs)
    full = tuple(dataclasses.replace(w, kv_blocks_used=int(0.99 * w.kv_blocks_total), waiting=30)
                 if w.role is PoolRole.DECODE else w for w in obs.workers)
    busy = tick(config, MODEL, ControllerState(), dataclasses.replace(obs, workers=full))
    assert busy.inputs["decode_need_kv"] > 4 > calm.inputs["decode_need_kv"]
    assert busy.inputs["decode_need"] > calm.inputs["decode_need"]


def test_a_full_kv_cache_that_admits_every_request_does_not_raise_the_decode_need() -> None:
    # Long prompts fill the one decode worker's cache past the high water, but nothing waits for it: the plan is
    # working (a 7:1 split for summaries lives there), so KV use alone moves no worker.
    config = make_config()
    obs = World(2, 4, CHAT).observe()
    full = tuple(dataclasses.replace(w, kv_blocks_used=int(0.99 * w.kv_blocks_total), waiting=0)
                 if w.role is PoolRole.DECODE else w for w in obs.workers)
    decision = tick(config, MODEL, ControllerState(), dataclasses.replace(obs, workers=full))
    assert decision.inputs["kv_used_fraction"] > 0.9
    assert decision.inputs["kv_short"] == 0.0 and decision.inputs["decode_need_kv"] == 0.0
    assert decision.inputs["decode_need"] == max(decision.inputs["decode_need_steady"],
                                                 decision.inputs["decode_need_queue"])


# --- pin, draining, no traffic ------------------------------------------------------------------------------------


def test_pin_is_honoured_one_move_per_tick_without_confirmation_or_cooldown() -> None:
    config = make_config(pin=(1, 5))
    world = World(4, 2, SUMMARY)  # the traffic wants prefill; the pin does not
    decisions, _ = world.run(config, 5)
    assert [d.action for d in decisions] == [Action.MOVE] * 3 + [Action.HOLD] * 2
    assert all(d.target == (1, 5) and d.reason.startswith("Pinned") for d in decisions)
    assert world.sizes() == (1, 5)
    nan = math.nan
    idle = dataclasses.replace(world.observe(), traffic=TrafficWindow(30.0, 0.0, 0, nan, nan, nan, nan, nan, nan, nan))
    toward = tick(make_config(pin=(2, 4)), MODEL, ControllerState(), idle)  # pinned: regardless of traffic
    assert toward.action is Action.MOVE and toward.moves[0].to_role is PoolRole.PREFILL


def test_pin_beyond_a_fixed_size_is_clamped_and_says_so() -> None:
    decision = tick(make_config(pin=(4, 4)), MODEL, ControllerState(), World(2, 4, CHAT).observe())
    assert decision.target == (4, 2) and decision.action is Action.MOVE
    assert "budget allows 6" in decision.reason


def test_pin_with_budget_adds_toward_it() -> None:
    decision = tick(make_config(pin=(3, 4), max_workers=8), MODEL, ControllerState(), World(2, 4, CHAT).observe())
    assert decision.action is Action.ADD and decision.add == (PoolRole.PREFILL,)


def test_draining_worker_holds_and_restarts_the_cooldown() -> None:
    obs = World(2, 4, SUMMARY).observe()
    workers = (dataclasses.replace(obs.workers[2], draining=True),) + obs.workers[:2] + obs.workers[3:]
    state = ControllerState(candidate=(5, 1), candidate_ticks=5)
    decision = tick(make_config(), MODEL, state, dataclasses.replace(obs, workers=workers, now_s=100.0))
    assert decision.action is Action.HOLD
    assert decision.current == (2, 3)  # the draining worker counts in neither pool
    assert decision.state.last_move_s == 100.0 and decision.state.candidate is None
    assert "w02 in transition" in decision.reason
    pinned = tick(make_config(pin=(5, 1)), MODEL, state, dataclasses.replace(obs, workers=workers))
    assert pinned.action is Action.HOLD


def test_a_shift_sends_more_workers_the_same_way_while_the_first_are_in_transition() -> None:
    # Chat at (2, 4), then many summaries: w02 is already on its way to prefill when the tick sees how far the mix
    # moved. More decode workers follow at once, planned from (3, 3), where the pools are heading.
    config = make_config(max_moves=4)
    world = World(2, 4, CHAT)
    _, state = world.run(config, 3)
    world.traffic = (14.0, 2000, 50)  # the averages alone load (3, 3) 1.3, over 1.5x its best split
    obs = world.observe()
    on_its_way = tuple(dataclasses.replace(w, draining=True, joining=PoolRole.PREFILL) if w.worker_id == "w02"
                       else w for w in obs.workers)
    decision = tick(config, MODEL, state, dataclasses.replace(obs, workers=on_its_way))
    assert decision.action is Action.MOVE and "more go the same way" in decision.reason
    assert decision.current == (3, 3) and decision.target[0] > 3
    assert "w02" not in {m.worker_id for m in decision.moves}
    assert all(m.to_role is PoolRole.PREFILL for m in decision.moves)
    assert len(decision.moves) == decision.target[0] - 3

    # the worker in transition going the other way, or to no known pool: hold, as ever
    for joining in (PoolRole.DECODE, None):
        other = tuple(dataclasses.replace(w, draining=True, joining=joining) if w.worker_id == "w02" else w
                      for w in obs.workers)
        held = tick(config, MODEL, state, dataclasses.replace(obs, workers=other))
        assert held.action is Action.HOLD and "w02 in transition" in held.reason


def test_no_traffic_holds() -> None:
    obs = World(2, 4, CHAT).observe()
    nan = math.nan
    idle = TrafficWindow(30.0, 0.0, 0, nan, nan, nan, nan, nan, nan, nan)
    decision = tick(make_config(), MODEL, ControllerState(), dataclasses.replace(obs, traffic=idle))
    assert decision.action is Action.HOLD and "no traffic" in decision.reason
    unknown = dataclasses.replace(idle, arrival_rate=3.0)
    decision = tick(make_config(), MODEL, ControllerState(), dataclasses.replace(obs, traffic=unknown))
    assert decision.action is Action.HOLD and "lengths are unknown" in decision.reason


def _cold_start(held_per_worker: int, router_waiting: int, queued_prefill_tokens: int = 0) -> Observation:
    """2:2 a few seconds into traffic: nothing has finished, so only the arrivals' prompt lengths are known."""
    nan = math.nan
    window = TrafficWindow(20.0, 2.0, 0, nan, nan, nan, nan, nan, nan, nan, router_waiting=router_waiting,
                           arrived_input_tokens=200.0)
    workers = tuple(WorkerObservation(f"w{i:02d}", PoolRole.PREFILL, False, queued_prefill_tokens=queued_prefill_tokens)
                    for i in range(2)) + tuple(
        WorkerObservation(f"w{i:02d}", PoolRole.DECODE, False, running=held_per_worker,
                          kv_blocks_used=held_per_worker * 220 // BLOCK, kv_blocks_total=KV_TOKENS // BLOCK)
        for i in range(2, 4))
    return Observation(12.0, workers, window)


def _twice(config: ControllerConfig, obs: Observation) -> tuple[Decision, Decision]:
    first = tick(config, MODEL, ControllerState(), obs)
    return first, tick(config, MODEL, first.state, dataclasses.replace(obs, now_s=obs.now_s + 3.0))


def test_before_anything_finishes_the_requests_decode_holds_call_for_decode_workers() -> None:
    """At a cold start nothing finishes for a request's whole life (live: 17 s), while the decode seats fill and the
    router holds the rest. The requests decode holds are a lower bound on its need that needs no output length (the
    prompts' lengths, prefill's, are known on arrival): an add, or a move toward decode, may act on it, confirmed as
    usual and not held back by the warm-up; a move away from decode or a remove may not."""
    full = _cold_start(8, 14)  # 30 requests held for 16 seats: ~4 decode workers
    first, second = _twice(make_config(max_num_seqs=8, max_workers=8, warmup_s=60.0), full)
    assert first.action is Action.HOLD and "seen 1 of 2" in first.reason
    assert second.action is Action.ADD and "no request has finished yet" in second.reason
    assert set(second.add) == {PoolRole.DECODE} and second.target[1] >= 4
    first, second = _twice(make_config(max_num_seqs=8, warmup_s=60.0), full)  # no room to add: a prefill worker moves
    assert first.action is Action.HOLD and second.action is Action.MOVE
    assert {m.to_role for m in second.moves} == {PoolRole.DECODE}
    for config, obs in ((make_config(max_num_seqs=8), _cold_start(0, 0, queued_prefill_tokens=20_000)),  # to prefill
                        (make_config(max_num_seqs=8, min_workers=2), _cold_start(1, 0))):  # a remove
        _, second = _twice(config, obs)
        assert second.action is Action.HOLD and "lengths are unknown" in second.reason
        assert "decode holds" in second.reason and second.inputs["decode_held"] == sum(
            w.running for w in obs.active(PoolRole.DECODE))


# --- budget -------------------------------------------------------------------------------------------------------


def test_budget_adds_when_no_split_is_enough_and_stops_at_max_workers() -> None:
    config = make_config(max_workers=8, cooldown_s=10.0)
    world = World(2, 4, (75.0, 200, 400))  # needs ~2.5 prefill + ~4.3 decode: more than 6
    decisions, _ = world.run(config, 40)
    adds = [d for d in decisions if d.action is Action.ADD]
    assert len(adds) == 1 and len(adds[0].add) == 2  # sized in one step (to the queue first: a move follows)
    assert adds[0].reason.startswith("Add 2 workers") and "budget 8" in adds[0].reason
    assert world.sizes() == (3, 5) == best_sizes(decisions[-1], 8)
    assert not acted(decisions[-20:])


def test_overloaded_at_the_budget_splits_by_the_averages_and_does_not_chase_its_queues() -> None:
    """At 100 req/s 8 workers are not enough whichever way they split. The queue lands in the shorter pool; following
    it would move a worker there and back every cooldown, so the split follows the averages and holds."""
    config = make_config(max_workers=8, cooldown_s=10.0)
    world = World(2, 4, (100.0, 200, 400))  # needs ~3.3 prefill + ~6.0 decode
    decisions, _ = world.run(config, 60)
    assert sum(world.sizes()) == 8
    assert not acted(decisions[-30:])
    assert decisions[-1].inputs["overloaded"] == 1.0 and "overloaded" in decisions[-1].reason
    need_p, need_d = decisions[-1].inputs["prefill_need_steady"], decisions[-1].inputs["decode_need_steady"]
    assert world.sizes() == min(((p, 8 - p) for p in range(1, 8)),
                                key=lambda s: evaluate(need_p, need_d, s).bottleneck)


def test_budget_sheds_a_fallen_load_at_once_taking_the_least_loaded_workers() -> None:
    config = make_config(min_workers=3)
    world = World(2, 4, (10.0, 200, 400))  # needs ~0.3 prefill + ~0.6 decode: 3 workers are plenty
    obs = world.observe()
    workers = tuple(dataclasses.replace(w, running=w.running + 1) if w.worker_id in ("w00", "w02") else w
                    for w in obs.workers)
    first = tick(config, MODEL, ControllerState(), dataclasses.replace(obs, workers=workers))
    second = tick(config, MODEL, first.state, dataclasses.replace(obs, workers=workers, now_s=5.0))
    assert first.action is Action.HOLD and second.action is Action.REMOVE
    assert second.target == (1, 2) and second.reason.startswith("Remove 3 workers")
    assert second.remove == ("w01", "w03", "w04")  # down to the floor in one decision, never the busier w00, w02


def test_budget_removes_only_as_many_as_keep_every_smaller_split_at_scale_down_load() -> None:
    config = make_config(min_workers=2)
    world = World(3, 5, (75.0, 200, 400))  # needs ~2.5 prefill + ~4.3 decode: 8 workers, (3, 5), loaded ~0.86
    need_p, need_d = 2.5, 4.3
    decisions, _ = world.run(config, 3)
    assert not acted(decisions)  # 7 workers would be loaded above scale_down_load 0.85
    world.traffic = (45.0, 200, 400)  # 0.6 of it
    decisions, _ = world.run(config, 3)
    (removal,) = [d for d in decisions if d.action is Action.REMOVE]
    kept = sum(removal.target)
    need_p, need_d = removal.inputs["prefill_need"], removal.inputs["decode_need"]
    loads = {n: min(evaluate(need_p, need_d, (p, n - p)).bottleneck for p in range(1, n)) for n in range(2, 9)}
    assert all(loads[n] <= 0.85 for n in range(kept, 8)) and loads[kept - 1] > 0.85
    assert len(removal.remove) == 8 - kept >= 2 and world.sizes() == removal.target


def test_scale_down_waits_its_own_longer_cooldown_after_scaling_up() -> None:
    """Load comes, workers are added (and moved: moves wait only cooldown_s); the load goes right after. The removes
    wait scale_down_cooldown_s after the last change."""
    config = make_config(max_workers=8, min_workers=4, cooldown_s=10.0, scale_down_cooldown_s=60.0)
    world = World(2, 4, (75.0, 200, 400))
    decisions, state = world.run(config, 4)
    adds = [d.now_s for d in decisions if d.action is Action.ADD]
    moves = [d.now_s for d in decisions if d.action is Action.MOVE]
    assert adds and moves and moves[0] - adds[-1] < 60.0
    world.traffic = (5.0, 200, 400)
    later, _ = world.run(config, 40, state)
    removes = [d.now_s for d in later if d.action is Action.REMOVE]
    assert removes and removes[0] - max(adds + moves) >= 60.0
    assert all(b - a >= 60.0 for a, b in zip(removes, removes[1:]))
    assert sum(world.sizes()) == 4
    waiting = [d for d in later if d.action is Action.HOLD and "scale_down_cooldown_s" in d.reason]
    assert waiting


def test_a_worker_leaving_is_not_waited_for_but_one_starting_is() -> None:
    """A removed worker takes no new requests while its last ones finish (tens of seconds on a decode worker): the
    next remove waits scale_down_cooldown_s from the remove, not from the end of its drain. A worker starting (or
    moving) still holds the controller."""
    config = make_config(min_workers=3, scale_down_cooldown_s=20.0)
    world = World(2, 4, (10.0, 200, 400))  # needs ~0.3 prefill + ~0.6 decode: room to remove

    def with_worker(now_s: float, **transition: object) -> Observation:
        world.now = now_s
        obs = world.observe()
        extra = WorkerObservation("w99", PoolRole.DECODE, True, running=8, **transition)
        return dataclasses.replace(obs, workers=(*obs.workers, extra))

    start = ControllerState(last_move_s=0.0, traffic_since_s=-1000.0, fitted_input_tokens=200)
    state = start
    for t in (10.0, 15.0):  # confirming, then the cooldown from the last change at 0 s
        state = tick(config, MODEL, state, with_worker(t, leaving=True)).state
    decision = tick(config, MODEL, state, with_worker(20.0, leaving=True))
    assert decision.action is Action.REMOVE  # 20 s after the last change, w99 still draining
    assert decision.remove != ("w99",)
    state = start
    for t in (10.0, 15.0):
        state = tick(config, MODEL, state, with_worker(t, joining=PoolRole.DECODE)).state
    starting = tick(config, MODEL, state, with_worker(20.0, joining=PoolRole.DECODE))
    assert starting.action is Action.HOLD and "w99 in transition" in starting.reason


def test_per_pool_bounds_hold_in_moves_and_adds() -> None:
    """Chat wants many decode workers; max_decode caps them, so an add goes to prefill and no move passes the cap."""
    config = make_config(max_workers=9, cooldown_s=10.0, max_decode=4)
    world = World(3, 3, (75.0, 200, 400))  # needs ~2.5 prefill + ~4.3 decode
    decisions, _ = world.run(config, 60)
    assert all(d.target[1] <= 4 for d in decisions)
    assert world.sizes()[1] <= 4 and world.sizes()[1] == 4
    with pytest.raises(ControllerConfigError, match="max_decode"):
        make_config(max_decode=0)


# --- corrections --------------------------------------------------------------------------------------------------


def test_corrections_move_toward_observed_over_predicted_and_stay_clamped() -> None:
    config = make_config(pin=(3, 3))  # pinned, so only the corrections change
    slow = World(3, 3, CHAT, truth=(2.0, 1.5))
    decisions, state = slow.run(config, 30)
    ttft = [d.state.ttft_correction for d in decisions]
    tpot = [d.state.tpot_correction for d in decisions]
    assert ttft[0] > 1.0 and tpot[0] > 1.0 and tpot == sorted(tpot)
    # the fixed point: the factor on the prefill time, not the (larger) ratio of TTFTs that queueing inflates
    assert ttft[-1] == pytest.approx(2.0, rel=0.02)
    assert tpot[-1] == pytest.approx(1.5, rel=0.02)
    assert decisions[-1].inputs["ttft_correction"] == ttft[-1]
    assert decisions[-1].inputs["predicted_ttft_p50_s"] == pytest.approx(slow.observe().traffic.ttft_p50_s, rel=0.05)

    extreme, _ = World(3, 3, (2.0, 200, 400), truth=(10.0, 0.1)).run(config, 30)
    low, high = CORRECTION_RANGE
    assert all(d.state.ttft_correction <= high and d.state.tpot_correction >= low
               for d in extreme)
    assert extreme[-1].state.ttft_correction == pytest.approx(high, rel=1e-3)
    assert extreme[-1].state.tpot_correction == pytest.approx(low, rel=1e-3)


def test_corrections_ignore_windows_with_few_finished_requests() -> None:
    _, state = World(3, 3, CHAT, truth=(2.0, 2.0), finished=5).run(make_config(), 5)
    assert state.ttft_correction == 1.0 and state.tpot_correction == 1.0


def test_ttft_correction_learns_through_removes_and_waits_after_growth() -> None:
    """Live, an afternoon of removes a drain apart left no window without a change, and a TTFT correction learned in
    the peak's queues (1.5) stayed for minutes. Each window's TTFTs are those of the pools its requests ran under:
    predicted for those pools, the correction comes back to the truth (1.0) though a remove comes every few ticks.
    A pool that grows (an add or a move) still waits for a settled window."""
    config = make_config()
    window_s = World(3, 3, CHAT).observe().traffic.window_s
    shrinking = [size for size in range(8, 1, -1) for _ in range(3)]  # a remove every third tick
    sizes = [*shrinking, 3, 3, 3]  # then an add
    ticks_per_window = round(window_s / config.interval_s)

    def ran_under(tick_no: int) -> list[int]:
        return sizes[max(0, tick_no - ticks_per_window + 1):tick_no + 1]

    def observed(tick_no: int) -> Observation:
        """The world at this tick's pool, with the TTFT p50 of the window's ticks' pools (the requests ran there)."""
        world = World(sizes[tick_no], 3, CHAT)
        world.now = tick_no * config.interval_s
        obs = world.observe()
        recent = ran_under(tick_no)
        ttft = sum(World(size, 3, CHAT).observe().traffic.ttft_p50_s for size in recent) / len(recent)
        return dataclasses.replace(obs, traffic=dataclasses.replace(obs.traffic, ttft_p50_s=ttft))

    state = ControllerState(ttft_correction=1.5, traffic_since_s=-1000.0)
    corrections, updated = [], []
    for tick_no in range(len(sizes)):
        obs = observed(tick_no)
        state = dataclasses.replace(state, last_move_s=obs.now_s)  # never a settled window
        state, inputs = update_corrections(config, MODEL, state, obs)
        corrections.append(state.ttft_correction)
        updated.append(inputs["ttft_correction_updated"])
        assert inputs["prefill_ran_under"] == pytest.approx(sum(ran_under(tick_no)) / len(ran_under(tick_no)))
    assert corrections[0] < 1.5
    assert all(c == pytest.approx(1.0, abs=0.02) for c in corrections[len(shrinking) // 2:])
    assert updated[:len(shrinking)] == [1.0] * len(shrinking) and updated[len(shrinking):] == [0.0] * 3
    assert state.tpot_correction == 1.0  # TPOT still waits for a settled window


def test_corrections_steer_the_split() -> None:
    """The model says chat wants (2, 4); the hardware prefills 1.6x slower, so it settles with more prefill."""
    world = World(2, 4, CHAT, truth=(1.6, 1.0))
    decisions, _ = world.run(make_config(), 60)
    assert world.sizes() == (3, 3) == best_sizes(decisions[-1], 6)
    assert decisions[-1].state.ttft_correction == pytest.approx(1.6, rel=0.05)


# --- the loop -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [(5, 1), (1, 5), (3, 3)])
@pytest.mark.parametrize("traffic, best", [(CHAT, (2, 4)), (SUMMARY, (5, 1))])
def test_simulated_loop_converges_to_the_best_split_from_anywhere(start: tuple[int, int], traffic: tuple,
                                                                  best: tuple[int, int]) -> None:
    world = World(*start, traffic, jitter=0.05, seed=sum(start))
    decisions, _ = world.run(make_config(), 60)
    assert world.sizes() == best
    assert all(d.moves[0].to_role is (PoolRole.PREFILL if best[0] > start[0] else PoolRole.DECODE)
               for d in acted(decisions))  # never overshoots and comes back
    assert len(acted(decisions)) == abs(best[0] - start[0])


# --- decision and config ------------------------------------------------------------------------------------------


def test_decision_json_round_trip() -> None:
    world = World(2, 4, SUMMARY)
    decisions, _ = world.run(make_config(shift_ratio=math.inf), 2)
    move = decisions[1]
    assert move.action is Action.MOVE and move.moves == (Move("w02", PoolRole.PREFILL),)
    again = Decision.from_json(move.to_json())
    assert again.inputs.keys() == move.inputs.keys()
    assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(again.inputs.values(),
                                                                             move.inputs.values()))
    assert dataclasses.replace(again, inputs={}) == dataclasses.replace(move, inputs={})
    assert again.state.fitted_input_tokens == 2000  # the prompts the move fitted the split to

    odd = Decision(1.0, Action.ADD, (0, 1), (1, 1), add=(PoolRole.PREFILL,), remove=(), reason="r",
                   inputs={"inf": math.inf, "nan": math.nan}, state=ControllerState())
    text = odd.to_json()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    back = Decision.from_json(text)
    assert back.state.last_move_s == -math.inf and back.inputs["inf"] == math.inf and math.isnan(back.inputs["nan"])
    assert back.add == (PoolRole.PREFILL,)


@pytest.mark.parametrize("changes, field", [
    ({"slo_ttft_s": 0}, "slo_ttft_s"),
    ({"confirm_ticks": 0}, "confirm_ticks"),
    ({"max_moves": 0}, "max_moves"),
    ({"pin": (0, 3)}, "pin"),
    ({"max_workers": 1}, "max_workers"),
    ({"min_workers": 6, "max_workers": 4}, "min_workers"),
    ({"scale_down_load": 1.0}, "scale_down_load"),
])
def test_bad_config_names_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ControllerConfigError, match=field):
        make_config(**changes)


def test_decode_is_sized_for_the_arrivals_output_length_before_any_of_them_finish() -> None:
    """Summaries give way to chat: the window's finished requests are still summaries (50-token outputs), but the
    arrivals' prompts are chat-length, and the controller learned chat's output length before."""
    config = make_config()
    world = World(5, 1, CHAT)
    _, state = world.run(config, 3)  # learns chat: 200-token prompts, 400-token outputs
    world.traffic = SUMMARY
    _, state = world.run(config, 3, state)  # and summaries: 2000-token prompts, 50-token outputs
    assert state.output_by_class[prompt_class(200)] == 400 and state.output_by_class[prompt_class(2000)] == 50

    summaries = world.observe()
    chat_arriving = dataclasses.replace(summaries, traffic=dataclasses.replace(
        summaries.traffic, arrival_rate=CHAT[0], arrived_input_tokens=200.0,
        arrived_by_class=class_counts([200] * 1000)))
    blind = tick(config, MODEL, dataclasses.replace(state, output_by_class=()), chat_arriving)
    seeing = tick(config, MODEL, state, chat_arriving)
    assert blind.inputs["osl"] == 50 and seeing.inputs["osl"] == 400 and seeing.inputs["finished_osl"] == 50
    assert seeing.inputs["decode_need_steady"] > 5 * blind.inputs["decode_need_steady"]
    assert seeing.target[1] > blind.target[1]


def test_no_move_while_warming_up_and_again_after_an_idle_spell() -> None:
    config = make_config(warmup_s=20.0, interval_s=5.0, shift_ratio=math.inf)
    world = World(5, 1, CHAT)  # far from chat's best split
    first, state = world.run(config, 4)
    assert not acted(first) and "warming up" in first[-1].reason
    later, state = world.run(config, 2, state)
    assert acted(later)  # 20 s of traffic seen
    idle = dataclasses.replace(world.observe(), traffic=dataclasses.replace(
        world.observe().traffic, arrival_rate=0.0, finished=0))
    assert "no traffic" in tick(config, MODEL, state, idle).reason
    again = tick(config, MODEL, tick(config, MODEL, state, idle).state, world.observe())
    assert "warming up" in again.reason


def test_warming_up_holds_moves_and_removes_but_not_an_add_the_load_calls_for() -> None:
    """The warm-up keeps the controller from acting on lengths learned from the first (short) answers; those read the
    need low, so an add they call for is needed at least as much, and waiting only lets the queue build (live, the
    first 40 s of a day started at 2:2). Removes and moves still wait for the warm-up."""
    busy = World(2, 4, (75.0, 200, 400))  # needs ~2.5 prefill + ~4.3 decode: more than 6
    decisions, _ = busy.run(make_config(max_workers=8, warmup_s=60.0, interval_s=5.0), 4)
    adds = [d for d in decisions if d.action is Action.ADD]
    assert len(adds) == 1 and decisions[0].action is Action.HOLD  # confirmed on the second tick, not the first
    assert not [d for d in decisions if d.action is Action.MOVE]
    quiet = World(2, 4, (10.0, 200, 400))  # needs ~0.3 prefill + ~0.6 decode: 3 workers are plenty
    decisions, _ = quiet.run(make_config(min_workers=3, warmup_s=60.0, interval_s=5.0), 4)
    assert not acted(decisions) and "warming up" in decisions[-1].reason


def test_a_mismatch_the_prompts_do_not_explain_waits_for_confirmation() -> None:
    """After the warm-up, the split fitting the averages badly is a shift only if the arriving prompts differ from
    the finished ones: otherwise (a correction grown from an overload, say) it is confirmed like any move."""
    world = World(2, 4, SUMMARY)
    decisions, _ = world.run(make_config(confirm_ticks=2), 2)
    assert decisions[0].inputs["prompt_shift"] == 1.0
    assert decisions[0].action is Action.HOLD and "seen 1 of 2" in decisions[0].reason
    assert decisions[1].action is Action.MOVE and "the mix has shifted" not in decisions[1].reason


def test_confirmation_counts_ticks_that_head_the_same_way_however_far() -> None:
    # A prefill queue that grows tick by tick points at (5, 1), then (4, 2): the same way from (2, 4), so the
    # second tick confirms; a target the other way, or a different number of workers, starts the count again.
    assert _same_way((5, 1), (4, 2), (2, 4))
    assert not _same_way((5, 1), (1, 5), (2, 4))
    assert not _same_way((5, 2), (4, 2), (2, 4))
    assert not _same_way(None, (4, 2), (2, 4))
    assert _same_way((2, 5), (2, 5), (2, 4)) and not _same_way((3, 4), (2, 5), (2, 4))
    # A rising load asks for more workers each tick, into the same pools: an add confirms however many it asks for.
    assert _same_way((2, 5), (2, 6), (1, 4)) and _same_way((2, 7), (2, 6), (1, 4))
    assert not _same_way((1, 5), (2, 5), (1, 4))  # one adds only decode, the other a prefill worker too
    assert _same_way((2, 3), (2, 3), (3, 4)) and not _same_way((2, 3), (1, 3), (3, 4))  # a remove: the same total
    assert not _same_way((2, 3), (2, 4), (3, 3))  # a remove, then a move


def test_a_plain_mismatch_moves_even_while_warming_up() -> None:
    """Summaries arriving at a chat split: the averages alone overload it far beyond shift_ratio, which no bias in
    the first lengths explains, so the warm-up does not hold the move back."""
    world = World(2, 4, SUMMARY)
    first, _ = world.run(make_config(warmup_s=60.0), 1)
    assert first[0].action is Action.MOVE and "the mix has shifted" in first[0].reason


def test_requests_held_on_decode_count_at_their_own_context() -> None:
    # Summaries arrive (long context, small B*) while decode still holds chat answers (short context): the held
    # requests are counted at the B* of their own context, read from the KV they use, not the summaries'.
    config = make_config()
    obs = World(2, 4, SUMMARY).observe()
    short = tuple(dataclasses.replace(w, running=40, waiting=0, kv_blocks_used=40 * 300 // BLOCK)
                  if w.role is PoolRole.DECODE else w for w in obs.workers)
    long = tuple(dataclasses.replace(w, kv_blocks_used=40 * 2025 // BLOCK) if w.role is PoolRole.DECODE else w
                 for w in short)
    at_300 = tick(config, MODEL, ControllerState(), dataclasses.replace(obs, workers=short)).inputs
    at_2025 = tick(config, MODEL, ControllerState(), dataclasses.replace(obs, workers=long)).inputs
    assert at_300["decode_held"] == at_2025["decode_held"] == 160
    assert at_300["decode_held_batch"] > at_2025["decode_held_batch"] == at_2025["decode_batch"]
    assert at_300["decode_need_queue"] < at_2025["decode_need_queue"]


@pytest.mark.parametrize("decode_full", [False, True])
def test_requests_the_router_holds_count_for_decode_never_for_prefill(decode_full):
    """The router sends a request on only once a decode worker has reserved room for it, so what it holds waits for
    decode, whether every decode worker is at max_num_seqs or one has a few slots left; counted as prefill backlog it
    sent workers to prefill and starved decode further."""
    from pdserve.controller.demand import estimate_needs

    config = make_config(max_num_seqs=64)
    running = 64 if decode_full else 60
    workers = (WorkerObservation("p0", PoolRole.PREFILL, False, running=1, queued_prefill_tokens=200),
               WorkerObservation("d0", PoolRole.DECODE, False, running=running, kv_blocks_used=running * 20,
                                 kv_blocks_total=KV_TOKENS // BLOCK))
    window = TrafficWindow(window_s=30.0, arrival_rate=10.0, finished=100, mean_input_tokens=200,
                           mean_output_tokens=100, ttft_p50_s=0.1, ttft_p90_s=0.2, tpot_p50_s=0.01,
                           tpot_p90_s=0.012, attainment=1.0, router_waiting=50)
    needs = estimate_needs(config, MODEL, ControllerState(), Observation(100.0, workers, window))
    assert needs.inputs["prefill_backlog_tokens"] == 200  # the prefill worker's own queue only
    assert needs.inputs["decode_held"] == running + 50
