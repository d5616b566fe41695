"""The router's admission queue: beyond `max_waiting` requests waiting for a worker, a new one is refused at once
(Overloaded -> RESOURCE_EXHAUSTED), and the waiting ones are not failed for it."""

import asyncio

import pytest

from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.errors import Overloaded, Unavailable
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.request_builder import ValidRequest


def request(n: int) -> ValidRequest:
    return ValidRequest(f"r{n}", (1, 2, 3), SamplingParams(max_tokens=4))


async def first_piece(orchestrator: Orchestrator, n: int):
    async for piece in orchestrator.generate(request(n)):
        return piece


def test_a_full_admission_queue_refuses_at_once_and_keeps_the_waiting_requests():
    async def go():
        orchestrator = Orchestrator(registry=None, namespace="test", colocated=False, block_size=16, max_waiting=2,
                                    worker_wait_s=1.0)
        waiting = [asyncio.create_task(first_piece(orchestrator, n)) for n in range(2)]
        await asyncio.sleep(0.05)  # both are waiting for a worker (there is none)
        assert orchestrator.waiting_count == 2
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Overloaded, match="router.max_waiting"):
            await first_piece(orchestrator, 2)
        refused_after = loop.time() - started
        assert orchestrator.waiting_count == 2  # the refusal took nothing from the queue
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        return refused_after, outcomes, orchestrator.waiting_count

    refused_after, outcomes, left = asyncio.run(go())
    assert refused_after < 0.1  # at once, not after a timeout
    # the waiting requests end only by their own wait for a worker (none ever joined), not by the refusal
    assert all(isinstance(o, Unavailable) and "no ready worker" in str(o) for o in outcomes)
    assert left == 0


def test_low_priority_requests_held_back_never_take_an_online_requests_place():
    """A client's flood of `priority: 1` requests waits in the priority gate; online requests still get in (they
    were refused with 429 once the low-priority ones filled `max_waiting`)."""
    from pdserve.router.admission import Admission

    admission = Admission(max_waiting=2)
    low = [admission.admit(ValidRequest(f"low{n}", (1,), SamplingParams(), priority=1)) for n in range(2)]
    with pytest.raises(Overloaded, match="low-priority"):
        admission.admit(ValidRequest("low2", (1,), SamplingParams(), priority=1))
    online = [admission.admit(ValidRequest(f"on{n}", (1,), SamplingParams())) for n in range(2)]
    with pytest.raises(Overloaded, match="2 requests are already waiting"):
        admission.admit(ValidRequest("on2", (1,), SamplingParams()))
    for ticket in low + online:
        ticket.dispatched()
    assert (admission.waiting_count, admission.low_waiting_count) == (0, 0)
