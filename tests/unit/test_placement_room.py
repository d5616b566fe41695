"""Requests waiting at the router: for KV room, a request that ends wakes the longest waiter only (one reserve call
per freed room, not one per waiter) and the others keep their turn, or retry on their own after ROOM_RETRY_S; for a
worker when none is ready (one died, its replacement is starting), up to router.worker_wait_s."""

import asyncio
from types import SimpleNamespace

import pytest

from pdserve.router import placement as placement_module
from pdserve.router.errors import Unavailable
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


def test_a_request_waits_for_a_worker_to_join_up_to_worker_wait_s():
    replacement = SimpleNamespace(worker_id="decode-1")

    async def go(wait_s: float):
        members: dict = {}
        placement = Placement(SimpleNamespace(members=members), block_size=16, worker_wait_s=wait_s)
        loop = asyncio.get_running_loop()
        joins_at = loop.time() + 0.3  # the replacement registers after 0.3 s
        pick = lambda: replacement if loop.time() >= joins_at else None  # noqa: E731
        members["decode-1"] = "the replacement's member"
        return await placement._choose(pick)

    assert asyncio.run(go(wait_s=2.0)) == "the replacement's member"
    with pytest.raises(Unavailable, match="router.worker_wait_s"):
        asyncio.run(go(wait_s=0.1))
