"""An attempt's release never waits on its workers: the aborts are sent at once and answered in the background
within `ABORT_TIMEOUT_S`, so a stopped (SIGSTOP) or dying worker cannot hold up a request's resumption elsewhere."""

import asyncio
from types import SimpleNamespace

from pdserve.engine import SamplingParams
from pdserve.router import attempt as attempt_module
from pdserve.router.attempt import Attempt, RouterParts
from pdserve.router.request_builder import ValidRequest
from pdserve.router.timings import RequestClock


def member(worker_id: str, calls: list, answered: asyncio.Event):
    """A worker whose aborts are recorded when sent and answered only once `answered` is set (never, if stopped)."""
    async def abort(*args):
        calls.append((worker_id, args))
        await answered.wait()

    handle = SimpleNamespace(abort_prefill=SimpleNamespace(remote=lambda *a: abort(*a)),
                             abort_decode=SimpleNamespace(remote=lambda *a: abort(*a)))
    return SimpleNamespace(info=SimpleNamespace(worker_id=worker_id), handle=handle)


def stopped_attempt(calls: list, answered: asyncio.Event) -> Attempt:
    parts = RouterParts("router-a", SimpleNamespace(acknowledge=lambda *a: None), None,
                        SimpleNamespace(close=lambda key: None), False)
    attempt = Attempt(parts, ValidRequest("r1", (5, 6, 7), SamplingParams()), "r1#0", 0, RequestClock(), lambda: None)
    attempt.prefill, attempt.decode = member("prefill-0", calls, answered), member("decode-0", calls, answered)
    return attempt


def test_release_sends_both_aborts_and_returns_without_waiting_for_a_stopped_worker(monkeypatch):
    monkeypatch.setattr(attempt_module, "ABORT_TIMEOUT_S", 0.2)

    async def go():
        calls, stopped = [], asyncio.Event()  # never set: the workers do not answer
        attempt = stopped_attempt(calls, stopped)
        started = asyncio.get_running_loop().time()
        attempt.release(finished=False)
        returned_after = asyncio.get_running_loop().time() - started
        await asyncio.sleep(0.05)
        sent = list(calls)
        pending = len(attempt_module._ABORTS)
        await asyncio.sleep(0.4)  # past ABORT_TIMEOUT_S: given up on
        return returned_after, sent, pending, len(attempt_module._ABORTS)

    returned_after, sent, pending, left = asyncio.run(go())
    assert returned_after < 0.05
    assert sent == [("prefill-0", ("r1#0",)), ("decode-0", ("r1#0", "router-a"))]
    assert pending == 2 and left == 0


def test_a_finished_attempt_sends_no_abort():
    async def go():
        calls = []
        attempt = stopped_attempt(calls, asyncio.Event())
        attempt.ended_on_worker = True
        attempt.release(finished=True)
        await asyncio.sleep(0.05)
        return calls

    assert asyncio.run(go()) == []
