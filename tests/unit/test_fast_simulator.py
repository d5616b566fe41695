"""The fast step-level simulator against the exact one (the real engines): the same trace and setup give the same
SLO attainment (within 2 points), mean TTFT and TPOT, and goodput (within 5%), from light load to overload, in the
regimes where each limit binds (prefill compute, max_num_seqs, KV blocks with preemption), with the controller, and
with a policy that adds and removes workers."""

import dataclasses
import math

import pytest

from pdserve.bench.fast_simulator import FastSimulation
from pdserve.bench.metrics import SLO, attainment
from pdserve.bench.planner import Candidate, PlanSetup, evaluate
from pdserve.bench.sim_setup import SimResult, SimSetup
from pdserve.bench.simulator import Simulation
from pdserve.bench.traffic import traffic_of
from pdserve.bench.workloads import WORKLOADS, Phase, TraceEntry, phase_trace
from pdserve.controller.config import ControllerConfig
from pdserve.controller.decision import Action
from pdserve.engine import EngineConfig
from pdserve.engine.config import SimSettings

SIM = EngineConfig(backend="sim", model="llama-3-8b", sim=SimSettings(hardware="h100"), max_num_seqs=128,
                   max_num_batched_tokens=4096)
SLO_ = SLO(ttft_s=1.0, tpot_s=0.05)
CHAT, SUMMARIES = WORKLOADS["chat"], WORKLOADS["summarization"]
FEW_SEQS = dataclasses.replace(SIM, max_num_seqs=24)
"""Decode workers that fill up on sequences."""
FEW_BLOCKS = dataclasses.replace(SIM, num_kv_blocks=2500)
"""Decode workers that fill up on KV blocks (40,000 tokens: ten 4,000-token summaries), and preempt."""


def _means(result: SimResult) -> tuple[float, float]:
    ok = [r for r in result.records if r.ok]
    return sum(r.ttft_s for r in ok) / len(ok), sum(r.tpot_s for r in ok) / len(ok)


def _agree(setup: SimSetup, trace: list[TraceEntry]) -> tuple[SimResult, SimResult, FastSimulation]:
    """Both simulators' results (and the fast one, to look inside), having checked that they agree."""
    exact = Simulation(setup, trace).run()
    fast_sim = FastSimulation(setup, trace)
    fast = fast_sim.run()
    assert len(fast.records) == len(exact.records) == len(trace)
    assert sorted(r.request_id for r in fast.records) == sorted(r.request_id for r in exact.records)
    assert sum(not r.ok for r in fast.records) == sum(not r.ok for r in exact.records)
    assert attainment(fast.records, SLO_) == pytest.approx(attainment(exact.records, SLO_), abs=0.02)
    (exact_ttft, exact_tpot), (fast_ttft, fast_tpot) = _means(exact), _means(fast)
    assert fast_ttft == pytest.approx(exact_ttft, rel=0.1, abs=0.002)
    assert fast_tpot == pytest.approx(exact_tpot, rel=0.05)
    assert fast.prompt_tokens == exact.prompt_tokens
    return exact, fast, fast_sim


@pytest.mark.parametrize("engine, prefill, decode, workload, rate", [
    (SIM, 1, 1, CHAT, 25),  # light
    (SIM, 1, 1, CHAT, 50),  # prefill near its limit
    (SIM, 1, 1, CHAT, 58),  # prefill overloaded
    (FEW_SEQS, 2, 1, CHAT, 10),
    (FEW_SEQS, 2, 1, CHAT, 14),  # the decode worker's max_num_seqs binds: the router waits
    (FEW_BLOCKS, 4, 1, SUMMARIES, 3),
    (FEW_BLOCKS, 4, 1, SUMMARIES, 6),  # its KV blocks bind: the router waits, the batch's growth preempts
])
def test_static_splits_agree_with_the_exact_simulator(engine, prefill, decode, workload, rate):
    trace = phase_trace([Phase(workload, 15, rate)], seed=2)
    _agree(SimSetup(engine, prefill, decode, SLO_), trace)


def test_preemption_is_modelled_where_kv_blocks_run_out():
    trace = phase_trace([Phase(SUMMARIES, 15, 6)], seed=2)
    *_, fast = _agree(SimSetup(FEW_BLOCKS, 4, 1, SLO_), trace)
    assert sum(getattr(w, "preemptions", 0) for w in fast.workers) > 0


def test_the_controller_moves_as_in_the_exact_simulator():
    config = ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05, interval_s=2, cooldown_s=4)
    trace = phase_trace([Phase(CHAT, 30, 25), Phase(SUMMARIES, 40, 10)], seed=3)
    setup = SimSetup(SIM, 1, 3, SLO_, controller=config, role_switch_s=1.0)
    exact, fast, _ = _agree(setup, trace)
    moves = [[(d.now_s, m.to_role) for d in result.decisions for m in d.moves] for result in (exact, fast)]
    assert moves[0] and moves[0] == moves[1]
    assert fast.pool_samples[-1] == exact.pool_samples[-1]


def test_a_policy_adds_and_removes_workers_as_in_the_exact_simulator():
    trace, start = [], 0.0
    for duration_s, rate in ((10, 4), (30, 40), (40, 3)):  # quiet, a surge of long prompts, quiet
        trace += [TraceEntry(start + i / rate, 2000, 20) for i in range(int(duration_s * rate))]
        start += duration_s
    config = ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05, interval_s=2, cooldown_s=4, min_workers=2,
                              max_workers=6)
    setup = SimSetup(SIM, 1, 1, SLO_, controller=config, policy="pdserve.examples.queue_scaler:QueueScaler",
                     policy_config={"add_above": 2, "quiet_ticks": 4}, worker_start_s=5)
    exact, fast, _ = _agree(setup, trace)
    changes = [[(d.now_s, d.action, d.add, d.remove) for d in r.decisions if d.action is not Action.HOLD]
               for r in (exact, fast)]
    assert {c[1] for c in changes[0]} == {Action.ADD, Action.REMOVE} and changes[0] == changes[1]
    assert fast.worker_seconds == pytest.approx(exact.worker_seconds, rel=0.01)


def test_goodput_agrees_with_the_exact_simulator():
    traffic = traffic_of(phases=[Phase(CHAT, 10, 20)], seed=4)
    setup = PlanSetup(engine=SIM, workers=2, slo=SLO_, controller=ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05),
                      search_low=1.0, search_high=4.0, search_runs=5)
    exact = evaluate(setup, Candidate(1, 1, False), traffic)
    fast = evaluate(dataclasses.replace(setup, fast=True), Candidate(1, 1, False), traffic)
    assert math.isfinite(exact.goodput_rps) and fast.goodput_rps == pytest.approx(exact.goodput_rps, rel=0.05)
    assert fast.attainment == pytest.approx(exact.attainment, abs=0.02)


def test_a_leaving_decode_worker_hands_its_requests_on_as_in_the_exact_simulator():
    """Long answers, then long prompts: the controller moves decode workers to prefill, and each one still decoding a
    second into its drain hands its requests on (prefilled again with their tokens so far)."""
    trace, start = [], 0.0
    for duration_s, rate, prompt, output in ((30, 20, 200, 600), (40, 12, 4000, 20)):
        trace += [TraceEntry(start + i / rate, prompt, output) for i in range(int(duration_s * rate))]
        start += duration_s
    config = ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05, interval_s=2, cooldown_s=4)
    waiting = SimSetup(SIM, 1, 3, SLO_, controller=config, role_switch_s=1.0)
    handing_on = dataclasses.replace(waiting, hand_on_after_s=1.0)
    exact = Simulation(handing_on, trace).run()
    fast = FastSimulation(handing_on, trace).run()
    assert all(r.ok for r in fast.records) and len(fast.records) == len(exact.records) == len(trace)
    assert attainment(fast.records, SLO_) == pytest.approx(attainment(exact.records, SLO_), abs=0.02)
    (exact_ttft, exact_tpot), (fast_ttft, fast_tpot) = _means(exact), _means(fast)
    assert fast_ttft == pytest.approx(exact_ttft, rel=0.1) and fast_tpot == pytest.approx(exact_tpot, rel=0.05)
    moves = [[(d.now_s, m.to_role) for d in result.decisions for m in d.moves] for result in (exact, fast)]
    assert moves[0] and moves[0] == moves[1]
    recomputed = [result.prompt_tokens - sum(e.input_tokens for e in trace) for result in (exact, fast)]
    assert recomputed[0] > 0 and recomputed[1] == pytest.approx(recomputed[0], rel=0.5)  # requests were handed on
    assert FastSimulation(waiting, trace).run().prompt_tokens == sum(e.input_tokens for e in trace)  # and not without


@pytest.mark.parametrize("change, field", [
    ({"engine": dataclasses.replace(SIM, speculative=dataclasses.replace(SIM.speculative, method="prompt_lookup"))},
     "engine.speculative"),
])
def test_what_the_fast_model_leaves_out_is_refused_by_name(change, field):
    setup = dataclasses.replace(SimSetup(SIM, 1, 1, SLO_), **change)
    with pytest.raises(ValueError, match=field):
        FastSimulation(setup, [TraceEntry(0.0, 100, 10)])


def test_shared_prefixes_with_prefix_caching_are_refused():
    trace = [TraceEntry(0.0, 100, 10, prefix_id=1, prefix_tokens=64), TraceEntry(0.1, 100, 10, prefix_id=1,
                                                                                  prefix_tokens=64)]
    with pytest.raises(ValueError, match="engine.prefix_caching"):
        FastSimulation(SimSetup(dataclasses.replace(SIM, prefix_caching=True), 1, 1, SLO_), trace)
    plain = FastSimulation(SimSetup(dataclasses.replace(SIM, prefix_caching=False), 1, 1, SLO_), trace).run()
    assert all(r.ok for r in plain.records)
