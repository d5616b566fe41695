"""`bench.fleet_sizing`: the static fleet sized for the peak holds the attainment target in every window, and no
split of one worker fewer does."""

import pytest

from pdserve.bench.fleet_sizing import size_static_fleet, worst_window
from pdserve.bench.metrics import SLO, RequestRecord
from pdserve.bench.planner import TARGET_ATTAINMENT, Candidate, PlanSetup, simulate
from pdserve.bench.workloads import WORKLOADS, Phase, phase_trace
from pdserve.controller.config import ControllerConfig
from pdserve.engine import EngineConfig
from pdserve.engine.config import SimSettings

SLO_ = SLO(ttft_s=1.0, tpot_s=0.05)
SIM = EngineConfig(backend="sim", model="llama-3-8b", sim=SimSettings(hardware="h100"), max_num_seqs=128,
                   max_num_batched_tokens=4096)


def _record(arrival_s: float, met: bool) -> RequestRecord:
    return RequestRecord(request_id=f"r{arrival_s}", arrival_s=arrival_s, input_tokens=10, output_tokens=5,
                         queue_s=0.0, ttft_s=0.1 if met else 5.0, tpot_s=0.01, e2e_s=1.0, itl_s=(), ok=True)


def test_the_worst_window_is_found_and_a_short_last_window_joins_the_one_before():
    records = [_record(t, met=not 10 <= t < 12) for t in range(30)]  # windows of 10 s: 1.0, 0.8, 1.0
    assert worst_window(records, SLO_, 10.0) == pytest.approx(0.8)
    records.append(_record(30.5, met=False))  # a last window of 0.5 s joins [20, 30): 10 of 11 met
    assert worst_window(records, SLO_, 10.0) == pytest.approx(0.8)
    assert worst_window(records[20:], SLO_, 10.0) == pytest.approx(10 / 11)


def test_the_peak_fleet_holds_every_window_and_one_worker_fewer_does_not():
    chat = WORKLOADS["chat"]
    trace = phase_trace([Phase(chat, 20, 20), Phase(chat, 10, 110), Phase(chat, 10, 20)], seed=2)
    setup = PlanSetup(engine=SIM, workers=6, slo=SLO_, controller=ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05),
                      search=False, fast=True)
    fleet = size_static_fleet(setup, trace, largest=6, prefill_share=0.5, window_s=10.0)
    assert fleet is not None and fleet.worst_window >= TARGET_ATTAINMENT
    assert 2 <= fleet.workers < 6  # the quiet phases need 2; the burst needs more, not the whole budget
    for prefill in range(1, fleet.workers - 1):  # every split of one fewer, not only those the search tried
        records = simulate(setup, Candidate(prefill, fleet.workers - 1 - prefill, False), trace).records
        assert worst_window(records, SLO_, 10.0) < TARGET_ATTAINMENT, prefill


def test_no_fleet_when_the_whole_budget_falls_short():
    trace = phase_trace([Phase(WORKLOADS["chat"], 10, 400)], seed=2)
    setup = PlanSetup(engine=SIM, workers=2, slo=SLO_, controller=ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05),
                      search=False, fast=True)
    assert size_static_fleet(setup, trace, largest=2, prefill_share=0.5, window_s=5.0) is None
