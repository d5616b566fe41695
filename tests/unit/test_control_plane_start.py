"""The control plane starts its controller in the background: a start that has to wait (no idle worker to profile)
or fails for a moment (a worker died) is tried again while the cluster serves on; a policy that refuses its settings
leaves the cluster without a controller, said in the log; none of them stops the cluster. A control plane that
adopts the workers takes the profile the last one measured from the registry instead of waiting for an idle one.
And a control plane that fails after adopting a running cluster leaves it serving."""

import asyncio
import dataclasses
import json
import logging
from types import SimpleNamespace

import pytest
import ray

from pdserve.config import ClusterConfig
from pdserve.control_plane import control_plane as module
from pdserve.control_plane.control_plane import ControlPlane
from pdserve.controller.config import ControllerConfigError
from pdserve.engine.step_profile import EngineBusy, StepProfile


class FakeLoop:
    def __init__(self) -> None:
        self.ran = asyncio.Event()

    async def run(self) -> None:
        self.ran.set()
        await asyncio.Event().wait()  # ticks until cancelled, as the real loop does

    async def close(self) -> None:
        pass


def control_plane(tmp_path, outcomes: list) -> ControlPlane:
    """A control plane whose controller start gives `outcomes` in turn (an exception to raise, or the loop)."""
    plane = ControlPlane(ClusterConfig(), str(tmp_path / "cluster.json"))
    calls = iter(outcomes)

    async def make(registry, scaler, adopted):
        outcome = next(calls)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    plane._controller = make
    return plane


def test_a_start_that_must_wait_or_fails_for_a_moment_is_tried_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(module, "CONTROLLER_RETRY_S", 0)
    loop = FakeLoop()
    plane = control_plane(tmp_path, [EngineBusy("no worker was idle"), ray.exceptions.RayError("worker died"),
                                     loop])

    async def go():
        task = asyncio.create_task(plane._control(None, None, False))
        await asyncio.wait_for(loop.ran.wait(), timeout=5)
        task.cancel()

    with caplog.at_level(logging.WARNING):
        asyncio.run(go())
    assert plane.controller is loop
    assert sum("not started yet" in r.message for r in caplog.records) == 2


def test_a_policy_that_refuses_its_settings_leaves_no_controller_and_returns(tmp_path, caplog):
    plane = control_plane(tmp_path, [ControllerConfigError("policy_config: unknown setting(s) ['x']")])
    with caplog.at_level(logging.ERROR):
        asyncio.run(asyncio.wait_for(plane._control(None, None, False), timeout=5))
    assert plane.controller is None
    assert any("unknown setting(s) ['x']" in r.message for r in caplog.records)


def test_any_other_failure_is_not_swallowed(tmp_path):
    plane = control_plane(tmp_path, [ValueError("a bug")])
    with pytest.raises(ValueError):
        asyncio.run(asyncio.wait_for(plane._control(None, None, False), timeout=5))


PROFILE = StepProfile(prefill_fixed_s=0.05, prefill_s_per_token=0.001, decode_fixed_s=0.02, decode_s_per_seq=0.001,
                      decode_s_per_kv_token=1e-6)


class KeptProfiles:
    """The registry's step profile slot."""

    def __init__(self, kept: str | None = None) -> None:
        self.kept = kept

    def publish_step_profile(self, profile: str) -> None:
        self.kept = profile

    def step_profile(self) -> str | None:
        return self.kept


def busy_then_idle_worker(busy_times: int) -> SimpleNamespace:
    """A worker actor whose `profile` is busy `busy_times` times, then measures PROFILE; counts its calls."""
    calls = []

    async def profile():
        calls.append(1)
        if len(calls) <= busy_times:
            raise EngineBusy("the engine must be idle")
        return PROFILE

    return SimpleNamespace(profile=SimpleNamespace(remote=profile), calls=calls)


def plane_with(tmp_path, worker) -> ControlPlane:
    plane = ControlPlane(ClusterConfig(), str(tmp_path / "cluster.json"))
    plane.workers = SimpleNamespace(actors={"decode-0": worker})
    return plane


def test_a_measured_profile_is_kept_and_an_adopting_control_plane_takes_it_without_asking_a_worker(tmp_path):
    registry, worker = KeptProfiles(), busy_then_idle_worker(busy_times=2)
    assert asyncio.run(plane_with(tmp_path, worker)._profile(registry, adopted=False)) == PROFILE
    assert len(worker.calls) == 3 and json.loads(registry.kept) == dataclasses.asdict(PROFILE)
    never_idle = busy_then_idle_worker(busy_times=10**9)
    assert asyncio.run(plane_with(tmp_path, never_idle)._profile(registry, adopted=True)) == PROFILE
    assert never_idle.calls == []


def test_fresh_workers_are_profiled_again_and_a_kept_profile_of_another_shape_is_not_taken(tmp_path):
    kept = json.dumps(dataclasses.asdict(PROFILE))
    worker = busy_then_idle_worker(busy_times=0)
    assert asyncio.run(plane_with(tmp_path, worker)._profile(KeptProfiles(kept), adopted=False)) == PROFILE
    assert len(worker.calls) == 1  # not adopted: new engines, measured
    other = KeptProfiles(json.dumps({"prefill_s": 1.0}))  # written by another version
    worker = busy_then_idle_worker(busy_times=0)
    assert asyncio.run(plane_with(tmp_path, worker)._profile(other, adopted=True)) == PROFILE
    assert len(worker.calls) == 1 and json.loads(other.kept) == dataclasses.asdict(PROFILE)


class Failing(ControlPlane):
    """A control plane whose start fails, after adopting a running cluster or not; records whether it stopped it."""

    def __init__(self, tmp_path, adopts: bool) -> None:
        super().__init__(ClusterConfig(), str(tmp_path / "cluster.json"))
        self.adopts = adopts
        self.stopped = False

    async def _serve(self, stop: asyncio.Event) -> None:
        self.adopted = self.adopts
        raise RuntimeError("a bug after adopting")

    async def _stop_all(self) -> None:
        self.stopped = True


def test_a_control_plane_that_fails_leaves_a_cluster_it_adopted_serving_and_stops_a_new_one(tmp_path):
    for adopts in (True, False):
        plane = Failing(tmp_path, adopts)
        with pytest.raises(RuntimeError):
            asyncio.run(plane.serve(asyncio.Event()))
        assert plane.stopped is not adopts


def test_a_task_that_fails_is_logged_at_once(caplog):
    async def fails():
        raise ValueError("a bug in a watch loop")

    async def go():
        task = asyncio.create_task(fails(), name="workers")
        task.add_done_callback(module._log_failure)
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.ERROR):
        asyncio.run(go())
    (record,) = [r for r in caplog.records if "workers task failed" in r.message]
    assert isinstance(record.exc_info[1], ValueError)


def test_joining_ray_is_tried_again_when_the_gcs_does_not_answer_and_the_last_failure_is_raised(monkeypatch, caplog):
    """`ray.init` that times out reaching the GCS (ConnectionError) is tried again, JOIN_ATTEMPTS in all; a join that
    goes through on a later try returns, and one that never does raises the last error."""
    from pdserve.control_plane import ray_head

    monkeypatch.setattr(ray_head, "JOIN_RETRY_S", 0.0)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    tries = []

    def init_failing(times: int):
        def init(address, namespace, logging_level):
            tries.append(address)
            if len(tries) <= times:
                raise ConnectionError(f"Failed to connect to Ray cluster at {address}")
        return init

    monkeypatch.setattr(ray, "init", init_failing(ray_head.JOIN_ATTEMPTS - 1))
    with caplog.at_level(logging.WARNING):
        ray_head.join_ray("127.0.0.1:1", "pdserve")
    assert len(tries) == ray_head.JOIN_ATTEMPTS
    assert "could not join Ray at 127.0.0.1:1" in caplog.text

    tries.clear()
    monkeypatch.setattr(ray, "init", init_failing(ray_head.JOIN_ATTEMPTS))
    with pytest.raises(ConnectionError, match="127.0.0.1:1"):
        ray_head.join_ray("127.0.0.1:1", "pdserve")
    assert len(tries) == ray_head.JOIN_ATTEMPTS
