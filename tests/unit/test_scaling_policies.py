"""Policies as plug-ins (`controller.policy`): loading one by name, the budget the adapters keep every policy within
(`refusal`), the example queue-threshold scaler, and the simulator growing and shrinking the fleet with the built-in
ratio controller and with the example (what `pdserve plan --policy` runs)."""

import dataclasses
import functools
import math

import pytest

from pdserve.bench.metrics import SLO, attainment
from pdserve.bench.sim_setup import SimSetup
from pdserve.bench.simulator import Simulation
from pdserve.bench.workloads import TraceEntry
from pdserve.controller.config import ControllerConfig, ControllerConfigError
from pdserve.controller.decision import Action, Decision, Move
from pdserve.controller.observation import Observation, PoolRole, TrafficWindow, WorkerObservation
from pdserve.controller.policy import PolicyContext, RatioPolicy, load_policy, refusal
from pdserve.engine import EngineConfig
from pdserve.engine.config import SimSettings
from pdserve.examples.queue_scaler import QueueScaler

SIM = EngineConfig(backend="sim", model="llama-3-8b", sim=SimSettings(hardware="h100"), max_num_seqs=128,
                   max_num_batched_tokens=4096)
SLO_ = SLO(ttft_s=1.0, tpot_s=0.05)
QUEUE_SCALER = "pdserve.examples.queue_scaler:QueueScaler"


def config(**changes: object) -> ControllerConfig:
    values: dict = {"slo_ttft_s": 1.0, "slo_tpot_s": 0.05, "interval_s": 5.0, "cooldown_s": 10.0, "warmup_s": 10.0,
                    "scale_down_cooldown_s": 30.0, "min_workers": 2, "max_workers": 6}
    values.update(changes)
    return ControllerConfig(**values)


def context(**changes: object) -> PolicyContext:
    return PolicyContext(config(**changes), model=None)


def observation(prefill: int, decode: int, waiting: int = 0, router_waiting: int = 0, now_s: float = 0.0,
                starting: PoolRole | None = None) -> Observation:
    workers = [WorkerObservation(f"p{i}", PoolRole.PREFILL, False, waiting=waiting) for i in range(prefill)]
    workers += [WorkerObservation(f"d{i}", PoolRole.DECODE, False, running=i) for i in range(decode)]
    if starting is not None:
        workers.append(WorkerObservation("new", starting, True, joining=starting))
    traffic = TrafficWindow(30.0, 1.0, 10, 100.0, 50.0, 0.1, 0.2, 0.01, 0.02, 1.0, router_waiting=router_waiting)
    return Observation(now_s, tuple(workers), traffic)


# --- loading ------------------------------------------------------------------------------------------------------


def test_policies_load_by_name_and_bad_names_or_settings_are_named_errors():
    assert isinstance(load_policy("", context()), RatioPolicy)
    assert isinstance(load_policy("ratio", context()), RatioPolicy)
    assert isinstance(load_policy(QUEUE_SCALER, context(), {"add_above": 2}), QueueScaler)
    for name, match in (("no_colon", "package.module:Class"), ("pdserve.nowhere:X", "cannot import"),
                        ("pdserve.examples.queue_scaler:Nope", "has no 'Nope'"),
                        ("pdserve.controller.decision:Move", "no tick")):
        with pytest.raises(ControllerConfigError, match=f"policy: .*{match}"):
            load_policy(name, context())
    with pytest.raises(ControllerConfigError, match="policy_config: unknown setting.*'add_abov'"):
        load_policy(QUEUE_SCALER, context(), {"add_abov": 2})
    with pytest.raises(ControllerConfigError, match="policy_config"):
        load_policy("", context(), {"add_above": 2})


def test_a_policy_written_for_another_api_version_is_refused(monkeypatch):
    monkeypatch.setattr(QueueScaler, "api_version", 2)
    with pytest.raises(ControllerConfigError, match="version 2"):
        load_policy(QUEUE_SCALER, context())


def test_an_operators_pin_below_the_pool_bounds_is_not_followed_and_the_controller_goes_on(caplog):
    """A pin set with `pdserve ratio --pin` (in Redis) that the bounds refuse raised in the tick and ended the
    controller's task, again after every restart."""
    import dataclasses

    from .test_controller import MODEL

    policy = load_policy("", PolicyContext(config(min_prefill=2, min_workers=3), model=MODEL))
    decision = policy.tick(dataclasses.replace(observation(2, 2), pin=(1, 3)))
    assert decision.action is not None and "not followed" in caplog.text


def test_a_configured_pin_below_the_pool_bounds_is_a_config_error_naming_it():
    from pdserve.config import parse_config
    from pdserve.engine.config import ConfigError

    with pytest.raises(ConfigError, match="pin_prefill"):
        parse_config({"controller": {"min_prefill": 2, "pin_prefill": 1, "pin_decode": 3}})


# --- the budget ---------------------------------------------------------------------------------------------------


def test_adapters_refuse_what_breaks_the_budget_or_names_no_active_worker():
    obs = observation(2, 2)
    sizes = obs.sizes

    def decision(**change: tuple) -> Decision:
        return Decision(0.0, Action.ADD if "add" in change else Action.REMOVE, sizes, sizes, **change)

    assert refusal(decision(add=(PoolRole.DECODE,)), obs, config()) == ""
    assert "max_workers (4)" in refusal(decision(add=(PoolRole.DECODE,)), obs, config(max_workers=4))
    assert "max_workers (None)" in refusal(decision(add=(PoolRole.DECODE,)), obs, config(max_workers=None))
    assert "max_decode (2)" in refusal(decision(add=(PoolRole.DECODE,)), obs, config(max_decode=2))
    assert refusal(decision(remove=("d1",)), obs, config()) == ""
    assert "min_workers (4)" in refusal(decision(remove=("d1",)), obs, config(min_workers=4))
    assert "not an active worker" in refusal(decision(remove=("d9",)), obs, config())
    assert "min_decode (2)" in refusal(decision(remove=("d1",)), obs, config(min_decode=2, min_workers=3))
    move = Decision(0.0, Action.MOVE, sizes, (3, 1), moves=(Move("d0", PoolRole.PREFILL),))
    assert refusal(move, obs, config()) == ""
    starting = observation(2, 2, starting=PoolRole.DECODE)  # one being added counts against the budget
    assert "max_workers (5)" in refusal(decision(add=(PoolRole.DECODE,)), starting, config(max_workers=5))
    # one being removed still holds its machine (an add counts it), but is not removed twice (a remove does not)
    leaving = dataclasses.replace(obs, workers=(*obs.workers, WorkerObservation("old", PoolRole.DECODE, True,
                                                                                leaving=True)))
    assert "max_workers (5)" in refusal(decision(add=(PoolRole.DECODE,)), leaving, config(max_workers=5))
    assert refusal(decision(remove=("d1",)), leaving, config(min_workers=3)) == ""
    assert "min_workers (4)" in refusal(decision(remove=("d1",)), leaving, config(min_workers=4))


# --- the example policy -------------------------------------------------------------------------------------------


def test_queue_scaler_adds_where_requests_wait_and_removes_after_quiet_ticks():
    scaler = QueueScaler(context(), {"add_above": 3, "quiet_ticks": 2})
    busy = scaler.tick(observation(2, 2, router_waiting=10))  # 10 waiting at the router for decode room / 2
    assert busy.action is Action.ADD and busy.add == (PoolRole.DECODE,) and "5.0 requests wait" in busy.reason
    prefill_busy = scaler.tick(observation(2, 2, waiting=4))  # 4 queued on each prefill worker
    assert prefill_busy.add == (PoolRole.PREFILL,)
    assert scaler.tick(observation(2, 2, starting=PoolRole.PREFILL)).action is Action.HOLD
    assert scaler.tick(observation(3, 2)).action is Action.HOLD  # quiet 1 of 2
    quiet = scaler.tick(observation(3, 2))
    assert quiet.action is Action.REMOVE and quiet.remove == ("p0",)
    at_floor = QueueScaler(context(min_workers=4), {"quiet_ticks": 1})
    assert at_floor.tick(observation(2, 2)).action is Action.HOLD
    at_budget = QueueScaler(context(max_workers=4), {})
    assert at_budget.tick(observation(2, 2, router_waiting=100)).action is Action.HOLD


# --- the simulator --------------------------------------------------------------------------------------------------


def _surge() -> list[TraceEntry]:
    """Quiet (4 req/s), a surge of long prompts (40 req/s, ten times the prefill one worker carries), quiet again."""
    trace, start = [], 0.0
    for duration_s, rate in ((30, 4), (60, 40), (150, 3)):
        trace += [TraceEntry(start + i / rate, 2000, 20) for i in range(int(duration_s * rate))]
        start += duration_s
    return trace


@functools.cache
def _floor_attainment() -> float:
    """The surge's attainment on the floor's fleet, 1:1 throughout."""
    return attainment(Simulation(SimSetup(SIM, 1, 1, SLO_), _surge()).run().records, SLO_)


@pytest.mark.parametrize("policy, settings", [("", {}), (QUEUE_SCALER, {"add_above": 2, "quiet_ticks": 4})])
def test_simulated_fleet_grows_for_a_surge_and_shrinks_after_it(policy, settings):
    trace = _surge()
    setup = SimSetup(SIM, 1, 1, SLO_, controller=config(), policy=policy, policy_config=settings, worker_start_s=10)
    result = Simulation(setup, trace).run()
    assert all(r.ok for r in result.records) and len(result.records) == len(trace)  # none lost to adds or removes
    adds = [d for d in result.decisions if d.action is Action.ADD]
    removes = [d for d in result.decisions if d.action is Action.REMOVE]
    assert adds and removes and adds[0].now_s >= 30 and all(d.reason for d in adds + removes)
    if policy == "":  # the built-in waits scale_down_cooldown_s; the example, its quiet ticks
        assert all(r.now_s >= adds[-1].now_s + 30 for r in removes)
    held = [s.held for s in result.pool_samples]
    assert max(held) <= 6 and min(held) >= 2 and held[-1] == 2
    assert not [d for d in result.decisions if d.reason.startswith("Refused")]
    static = Simulation(dataclasses.replace(setup, prefill=max(held) - 1, decode=1, controller=None), trace).run()
    assert result.worker_seconds < 0.75 * static.worker_seconds
    assert math.isclose(static.worker_seconds, max(held) * static.duration_s, rel_tol=1e-6)
    assert attainment(result.records, SLO_) > _floor_attainment() + 0.2
