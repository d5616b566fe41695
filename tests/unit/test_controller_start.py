"""The control plane starts its controller in the background: a start that has to wait (no idle worker to profile)
or fails for a moment (a worker died) is tried again while the cluster serves on; a policy that refuses its settings
leaves the cluster without a controller, said in the log; none of them stops the cluster."""

import asyncio
import logging

import pytest
import ray

from pdserve.config import ClusterConfig
from pdserve.control_plane import control_plane as module
from pdserve.control_plane.control_plane import ControlPlane
from pdserve.controller.config import ControllerConfigError
from pdserve.engine.step_profile import EngineBusy


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

    async def make(registry, scaler):
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
        task = asyncio.create_task(plane._control(None, None))
        await asyncio.wait_for(loop.ran.wait(), timeout=5)
        task.cancel()

    with caplog.at_level(logging.WARNING):
        asyncio.run(go())
    assert plane.controller is loop
    assert sum("not started yet" in r.message for r in caplog.records) == 2


def test_a_policy_that_refuses_its_settings_leaves_no_controller_and_returns(tmp_path, caplog):
    plane = control_plane(tmp_path, [ControllerConfigError("policy_config: unknown setting(s) ['x']")])
    with caplog.at_level(logging.ERROR):
        asyncio.run(asyncio.wait_for(plane._control(None, None), timeout=5))
    assert plane.controller is None
    assert any("unknown setting(s) ['x']" in r.message for r in caplog.records)


def test_any_other_failure_is_not_swallowed(tmp_path):
    plane = control_plane(tmp_path, [ValueError("a bug")])
    with pytest.raises(ValueError):
        asyncio.run(asyncio.wait_for(plane._control(None, None), timeout=5))
