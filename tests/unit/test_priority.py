"""Priorities without a model: the engine scheduler serves higher priority (a lower value) first and preempts lower
priority first, and a router's `PriorityGate` lets low-priority requests through only into spare capacity, in
priority order, never ahead of an online request waiting for a worker."""

import asyncio

import pytest

from pdserve.engine.request import BATCH_PRIORITY, ONLINE_PRIORITY, Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.priority_gate import PriorityGate

from .test_scheduler import expected_outputs, make, run_to_end, step


def req(order: int, prompt_len: int, priority: int, max_tokens: int = 4) -> Request:
    prompt = [100 * order + k for k in range(prompt_len)]
    return Request(f"r{order}", prompt, SamplingParams(max_tokens=max_tokens), order, priority=priority)


def test_waiting_requests_are_admitted_by_priority_then_arrival():
    _, sched = make(max_seqs=1)
    batch_old, batch_new, online = req(0, 4, BATCH_PRIORITY), req(1, 4, BATCH_PRIORITY), req(2, 4, ONLINE_PRIORITY)
    for r in (batch_old, batch_new, online):
        sched.add(r)
    finished_order = []
    while sched.has_work:
        step(sched, batch_old, batch_new, online)
        finished_order += [r.request_id for r in (batch_old, batch_new, online)
                           if r.status is RequestStatus.FINISHED and r.request_id not in finished_order]
    assert finished_order == ["r2", "r0", "r1"]


def test_a_waiting_online_request_preempts_a_running_batch_one_and_nothing_is_lost():
    _, sched = make(max_seqs=1)
    batch, online = req(0, 4, BATCH_PRIORITY, max_tokens=6), req(1, 4, ONLINE_PRIORITY)
    sched.add(batch)
    step(sched, batch)
    step(sched, batch)
    assert batch.status is RequestStatus.RUNNING and len(batch.output_token_ids) == 2
    sched.add(online)
    out = step(sched, batch, online)
    assert out.preempted == ("r0",) and [c.request_id for c in out.chunks] == ["r1"]
    run_to_end(sched, batch, online)  # the batch request is recomputed and ends with every token
    assert batch.num_preemptions == 1 and batch.output_token_ids == expected_outputs(batch)


def test_requests_of_one_priority_never_preempt_each_other_for_admission():
    _, sched = make(max_seqs=1)
    first, second = req(0, 4, BATCH_PRIORITY), req(1, 4, BATCH_PRIORITY)
    sched.add(first)
    step(sched, first)
    sched.add(second)
    assert step(sched, first, second).preempted == ()
    assert second.status is RequestStatus.WAITING


def test_out_of_blocks_the_lowest_priority_is_preempted_even_when_older():
    # 12 blocks of 4 tokens; two long requests fill them as they grow, and one must give way
    _, sched = make(num_blocks=6, max_seqs=4)
    batch, online = req(0, 8, BATCH_PRIORITY, max_tokens=8), req(1, 8, ONLINE_PRIORITY, max_tokens=8)
    sched.add(batch)
    sched.add(online)
    preempted = []
    for _ in range(60):
        if not sched.has_work:
            break
        preempted += step(sched, batch, online).preempted
    assert preempted and set(preempted) == {"r0"}
    assert online.num_preemptions == 0 and online.output_token_ids == expected_outputs(online)


def test_a_reservation_preempts_lower_priority_running_requests_only():
    _, sched = make(max_seqs=1)
    batch = req(0, 4, BATCH_PRIORITY)
    sched.add(batch)
    step(sched, batch)
    assert not sched.reserve(req(1, 4, BATCH_PRIORITY))  # the same priority waits for room
    online = req(2, 4, ONLINE_PRIORITY)
    assert sched.reserve(online) and online.status is RequestStatus.HELD
    assert batch.status is RequestStatus.WAITING and batch.num_computed_tokens == 0


def test_a_waiting_request_holds_back_reservations_of_its_priority_or_lower_only():
    _, sched = make()
    waiting = req(0, 4, BATCH_PRIORITY)
    sched.add(waiting)  # on a decode worker: one it preempted, or one resumed there
    assert not sched.reserve(req(1, 4, BATCH_PRIORITY)) and not sched.reserve(req(2, 4, BATCH_PRIORITY + 1))
    online = req(3, 4, ONLINE_PRIORITY)
    assert sched.reserve(online) and online.status is RequestStatus.HELD


def test_a_reservation_that_preempting_could_not_make_room_for_preempts_no_one():
    """Blocks: two free plus the batch request's two make four, the prompt needs five. Seats: three reservations
    waiting for their KV fill all three. Either way the reservation fails, and the batch requests keep their KV
    (each failed try used to preempt them again, so a router retrying its reservation starved them)."""
    _, sched = make(num_blocks=12)
    assert sched.reserve(req(0, 32, ONLINE_PRIORITY))  # 8 blocks held for KV that is on its way
    batch = req(1, 6, BATCH_PRIORITY, max_tokens=20)
    sched.add(batch)
    step(sched, batch)
    assert not sched.reserve(req(2, 20, ONLINE_PRIORITY))
    assert batch.status is RequestStatus.RUNNING and batch.num_preemptions == 0

    _, sched = make(num_blocks=80, max_seqs=3, budget=64)
    for i in range(3):
        assert sched.reserve(req(10 + i, 4, ONLINE_PRIORITY))
    long_batch = [req(i, 100, BATCH_PRIORITY, max_tokens=6) for i in range(2)]
    for r in long_batch:
        sched.add(r)
    for attempt in range(30):
        step(sched, *long_batch)
        assert not sched.reserve(req(100 + attempt, 4, ONLINE_PRIORITY))  # a router retrying
    assert all(r.num_preemptions == 0 for r in long_batch)


# ---- the router's gate ---------------------------------------------------------------------------------------

async def enter_all(gate: PriorityGate, priorities: list[int], entered: list[int]) -> list[asyncio.Task]:
    async def one(index: int, priority: int) -> None:
        await gate.enter(priority)
        entered.append(index)

    tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(priorities)]
    await asyncio.sleep(0.01)
    return tasks


def test_the_gate_lets_low_priority_through_up_to_its_limit_in_priority_order():
    async def go():
        gate, entered = PriorityGate(limit=2), []
        tasks = await enter_all(gate, [20, 10, 10, 5], entered)
        assert entered == [0, 1] and gate.queued == 2  # the first two found room at once
        gate.leave()
        await asyncio.sleep(0.01)
        assert entered == [0, 1, 3]  # priority 5 before the older 10
        gate.leave()
        await asyncio.sleep(0.01)
        assert entered == [0, 1, 3, 2]
        await asyncio.gather(*tasks)

    asyncio.run(go())


def test_the_gate_holds_low_priority_while_an_online_request_waits_and_forgets_a_cancelled_one():
    async def go():
        gate, entered = PriorityGate(limit=4), []
        gate.online_wait_started()
        tasks = await enter_all(gate, [10, 10], entered)
        assert entered == [] and gate.queued == 2
        tasks[0].cancel()
        await asyncio.sleep(0.01)
        assert gate.queued == 1
        gate.online_wait_ended()
        await asyncio.sleep(0.01)
        assert entered == [1] and gate.active == 1
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]

    asyncio.run(go())


def test_priority_travels_with_a_continuation():
    from pdserve.router.migration import continuation
    from pdserve.router.request_builder import ValidRequest

    request = ValidRequest("r", (1, 2, 3), SamplingParams(max_tokens=4), priority=BATCH_PRIORITY)
    resumed = continuation(request, [7])
    assert resumed.priority == BATCH_PRIORITY and resumed.token_ids == (1, 2, 3, 7)
