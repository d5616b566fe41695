"""Requests waiting for KV room at the router: a request that ends wakes the longest waiter only (one reserve call
per freed room, not one per waiter); the others keep their turn, or retry on their own after ROOM_RETRY_S."""

import asyncio

from pdserve.router import placement as placement_module
from pdserve.router.placement import Placement


def test_a_freed_room_wakes_the_longest_waiter_only_then_the_next(monkeypatch):
    monkeypatch.setattr(placement_module, "ROOM_RETRY_S", 5.0)

    async def go():
        placement = Placement(membership=None, block_size=16)
        waiters = []
        for _ in range(4):
            waiters.append(asyncio.create_task(placement._wait_for_room()))
            await asyncio.sleep(0)  # each queues in turn
        placement.room_freed()
        await asyncio.sleep(0.05)
        first = [w.done() for w in waiters]
        placement.room_freed()
        await asyncio.sleep(0.05)
        second = [w.done() for w in waiters]
        for w in waiters:
            w.cancel()
        return first, second

    first, second = asyncio.run(go())
    assert first == [True, False, False, False]
    assert second == [True, True, False, False]


def test_a_waiter_that_timed_out_gives_its_turn_to_the_next(monkeypatch):
    monkeypatch.setattr(placement_module, "ROOM_RETRY_S", 0.05)

    async def go():
        placement = Placement(membership=None, block_size=16)
        await placement._wait_for_room()  # nothing ends: it retries on its own after ROOM_RETRY_S
        monkeypatch.setattr(placement_module, "ROOM_RETRY_S", 5.0)
        later = asyncio.create_task(placement._wait_for_room())
        await asyncio.sleep(0)
        placement.room_freed()
        await asyncio.sleep(0.05)
        return later.done(), len(placement._waiters)

    assert asyncio.run(go()) == (True, 0)
