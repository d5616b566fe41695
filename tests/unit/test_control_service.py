"""The control plane's Control service runs a scale or drain to its end even when its caller goes away: a drain
stopped between drain and stop (the CLI's deadline, Ctrl-C) left its worker drained, serving nothing, for good."""

import asyncio

from pdserve.control_plane.control_service import ControlService
from pdserve.proto import generation_pb2 as pb


class SlowScaler:
    """Drains in two steps, as the real one does (drain, then stop), a moment apart; records each."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    async def drain(self, worker_id: str, replace: bool):
        self.steps.append(f"drained {worker_id}")
        await asyncio.sleep(0.2)
        self.steps.append(f"stopped {worker_id}")
        return [worker_id], []


def test_a_drain_whose_caller_is_cancelled_still_stops_its_worker():
    scaler = SlowScaler()
    service = ControlService(scaler)

    async def go():
        call = asyncio.create_task(service.Drain(pb.DrainRequest(worker_id="decode-0"), context=None))
        await asyncio.sleep(0.05)
        call.cancel()  # the operator's client gave up
        await asyncio.gather(call, return_exceptions=True)
        await asyncio.sleep(0.4)
        return call.cancelled()

    assert asyncio.run(go()) and scaler.steps == ["drained decode-0", "stopped decode-0"]
