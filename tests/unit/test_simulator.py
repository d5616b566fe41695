"""The sim engine backend and the discrete-event planner: real scheduler, routing and controller on a virtual clock."""

import math

import pytest

from pdserve.bench.metrics import SLO
from pdserve.bench.planner import PlanSetup, best_static, candidates, plan
from pdserve.bench.sim_setup import SimSetup
from pdserve.bench.simulator import Simulation
from pdserve.bench.traffic import traffic_of
from pdserve.bench.workloads import WORKLOADS, Phase, TraceEntry, phase_trace
from pdserve.controller.config import ControllerConfig
from pdserve.controller.decision import Action
from pdserve.engine import Engine, EngineConfig, SamplingParams
from pdserve.engine.config import SimSettings
from pdserve.engine.cost_model import ChunkShape, CostModel, Link
from pdserve.engine.hardware import hardware
from pdserve.engine.shapes import shape
from pdserve.engine.sim_runner import PLACEHOLDER_TOKEN

SIM = EngineConfig(backend="sim", model="llama-3-8b", sim=SimSettings(hardware="h100"), max_num_seqs=128,
                   max_num_batched_tokens=4096)
SLO_ = SLO(ttft_s=1.0, tpot_s=0.05)


def test_sim_engine_steps_cost_what_the_cost_model_says():
    engine = Engine(SIM, realtime=False)
    cost = CostModel(shape("llama-3-8b"), hardware("h100"))
    engine.add_request("a", [PLACEHOLDER_TOKEN] * 3000, SamplingParams(max_tokens=3, ignore_eos=True))
    engine.add_request("b", [PLACEHOLDER_TOKEN] * 100, SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()  # 3000 + 100 tokens, in one chunk each (budget 4096)
    expected = cost.step_cost([ChunkShape(3000, 3000), ChunkShape(100, 100)])
    assert engine.runner.last_cost.seconds == pytest.approx(expected.seconds)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert engine.blocks.num_used == 0 and engine.num_requests == 0
    assert engine.kv_cache.num_blocks == cost.kv_capacity_tokens(SIM.sim.gpu_memory_fraction) // SIM.block_size


def test_sim_engine_needs_a_known_shape_and_hardware():
    with pytest.raises(ValueError, match="engine.sim.hardware"):
        Engine(EngineConfig(backend="sim", model="llama-3-8b", sim=SimSettings(hardware="tpu-v9")), realtime=False)
    with pytest.raises(ValueError, match="engine.model"):
        Engine(EngineConfig(backend="sim", model="gpt-17"), realtime=False)


def _trace(n: int, input_tokens: int, output_tokens: int, gap_s: float) -> list[TraceEntry]:
    return [TraceEntry(i * gap_s, input_tokens, output_tokens) for i in range(n)]


def test_static_split_serves_every_request_with_modelled_latencies():
    trace = _trace(60, 800, 50, 0.05)
    result = Simulation(SimSetup(SIM, prefill=1, decode=1, slo=SLO_), trace).run()
    cost = CostModel(shape("llama-3-8b"), hardware("h100"))
    assert len(result.records) == 60 and all(r.ok for r in result.records)
    assert sorted(r.request_id for r in result.records) == sorted({r.request_id for r in result.records})
    assert all(r.output_tokens == 50 for r in result.records)
    assert min(r.ttft_s for r in result.records) >= cost.prefill_seconds(800) * 0.99
    assert min(r.tpot_s for r in result.records) >= cost.decode_step_seconds(1, 800) * 0.99
    assert result.decisions == ()


def test_overload_shows_as_missed_slos_not_lost_requests():
    trace = _trace(200, 4000, 20, 0.005)  # 200 long prompts in 1 s: far beyond one prefill worker
    result = Simulation(SimSetup(SIM, prefill=1, decode=1, slo=SLO_), trace).run()
    assert all(r.ok for r in result.records)
    assert sum(SLO_.met(r) for r in result.records) < 100


def shift_trace():
    chat, summary = WORKLOADS["chat"], WORKLOADS["summarization"]
    return phase_trace([Phase(chat, 40, 25), Phase(summary, 60, 10)], seed=3)


def test_controller_moves_workers_toward_prefill_when_prompts_get_long():
    config = ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05, interval_s=2, cooldown_s=4)
    trace = shift_trace()
    result = Simulation(SimSetup(SIM, prefill=1, decode=3, slo=SLO_, controller=config, role_switch_s=1.0),
                        trace).run()
    assert len(result.records) == len(trace) and all(r.ok for r in result.records)
    moves = [d for d in result.decisions if d.action is Action.MOVE]
    assert moves and all(m.to_role.value == "prefill" for d in moves for m in d.moves)
    assert result.pool_samples[-1].prefill > 1  # ends with more prefill workers than it started with


def test_plan_reports_every_split_and_the_controller():
    assert [c.name for c in candidates(4)] == ["1:3", "2:2", "3:1", "controller (from 2:2)"]
    setup = PlanSetup(engine=SIM, workers=3, slo=SLO_,
                      controller=ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05, interval_s=2, cooldown_s=4),
                      search=True, search_low=0.5, search_high=2.0, search_runs=3)
    reports = plan(setup, traffic_of(entries=_trace(40, 600, 30, 0.1)), processes=1)
    assert [r.name for r in reports] == ["1:2", "2:1", "controller (from 1:2)"]
    for r in reports:
        assert 0 <= r.attainment <= 1 and r.lost == 0 and len(r.goodput_points) >= 1
        assert math.isnan(r.goodput_rps) or r.goodput_rps >= 0
    assert best_static(reports).name in ("1:2", "2:1")


def test_a_leaving_decode_worker_hands_on_what_it_still_decodes():
    """Long answers on the moving decode worker: with hand-on they resume elsewhere (no request lost, every token
    counted once) and the worker switches long before its answers would have finished."""
    config = ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05, interval_s=2, cooldown_s=4, confirm_ticks=1,
                              pin=(2, 1))
    trace = _trace(24, 200, 1500, 0.05)  # 1,500-token answers: ~10 s of decoding each

    def run(hand_on_after_s):
        setup = SimSetup(SIM, prefill=1, decode=2, slo=SLO_, controller=config, role_switch_s=1.0,
                         hand_on_after_s=hand_on_after_s)
        sim = Simulation(setup, trace)
        return sim, sim.run()

    _, waited = run(None)
    sim, handed = run(0.5)
    for result in (waited, handed):
        assert len(result.records) == len(trace) and all(r.ok for r in result.records)
        assert sorted(r.request_id for r in result.records) == [f"r{i}" for i in sorted(range(24), key=str)]
        assert all(r.output_tokens == 1500 for r in result.records)
    drained = [next(s.t for s in r.pool_samples if s.decode == 1) for r in (waited, handed)]
    assert drained[1] < 4.0 < 8.0 < drained[0]  # handed on half a second in, versus waiting for the answers
    assert all(w.engine.num_requests == 0 for w in sim.workers)  # no blocks left held anywhere


def test_plan_candidates_can_be_limited_and_the_controller_started_elsewhere():
    assert [c.name for c in candidates(8, [3, 5], controller_prefill=7)] == ["3:5", "5:3", "controller (from 7:1)"]
    with pytest.raises(ValueError, match="--splits"):
        candidates(8, [8])


def test_layerwise_streaming_takes_the_transfer_off_the_second_token():
    """One request alone, two output tokens: the second comes a handoff and one decode step after the first."""
    trace = [TraceEntry(0.0, 4000, 2)]
    plain = Simulation(SimSetup(SIM, prefill=1, decode=1, slo=SLO_), trace).run().records[0]
    streamed = Simulation(SimSetup(SIM, prefill=1, decode=1, slo=SLO_, layerwise=True), trace).run().records[0]
    cost = CostModel(shape("llama-3-8b"), hardware("h100"))
    nbytes = -(-4000 // SIM.block_size) * SIM.block_size * cost.kv_bytes_per_token()
    last_step = cost.step_seconds([ChunkShape(4000, 4000)])
    saved = cost.transfer_seconds(nbytes, Link.NETWORK) - cost.streamed_transfer_seconds(nbytes, Link.NETWORK,
                                                                                        last_step)
    assert streamed.ttft_s == pytest.approx(plain.ttft_s)  # the first token comes from the prefill worker
    assert saved > 0.005
    assert plain.tpot_s - streamed.tpot_s == pytest.approx(saved, rel=0.01)
