"""A worker's heartbeat makes every Redis call on its own thread: starting and stopping it return at once even when
Redis hangs (a hung Redis once stalled a worker's event loop for the socket timeout), the first beat comes at once,
and the entry is removed after the last beat (so no beat in flight writes it again)."""

import threading
import time

from pdserve.registry.entries import Role, WorkerInfo, WorkerState
from pdserve.worker.heartbeat import Heartbeat

INFO = WorkerInfo("decode-0", Role.DECODE, "c-decode-0", 1, WorkerState.READY)


class HungRegistry:
    """Records calls; each blocks until `release` is set (a hung Redis)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = threading.Event()

    def heartbeat(self, info: WorkerInfo) -> None:
        self.calls.append("beat")
        self.release.wait(10)

    def remove(self, worker_id: str) -> None:
        self.calls.append("remove")
        self.release.wait(10)


def wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_start_and_stop_never_wait_for_redis_and_the_entry_goes_after_the_last_beat():
    registry = HungRegistry()
    heartbeat = Heartbeat(registry, lambda: INFO)
    began = time.monotonic()
    heartbeat.start()
    assert wait_for(lambda: registry.calls == ["beat"])  # the first beat at once, on the thread
    heartbeat.stop()
    assert time.monotonic() - began < 1.0  # neither waited for the hung call
    registry.release.set()
    assert wait_for(lambda: registry.calls == ["beat", "remove"])
