"""Spare capacity for low-priority requests at a router.

A request whose priority is above ONLINE_PRIORITY (the Batch API's, or a client's `priority`) goes to workers only
while this router has no online request waiting for a worker and fewer than `limit` low-priority requests are with
workers; until then it waits here, in priority order and then by arrival. So low-priority work fills the room
online traffic leaves and never queues ahead of it; on the workers the engines serve online requests first and
preempt low-priority ones first (`engine.scheduler`).

    await gate.enter(priority)   # waits for spare capacity (cancellable)
    ... run the request ...
    gate.leave()

Online requests tell the gate when they start and stop waiting for a worker (`online_waiting`, from `admission`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from pdserve.engine.request import ONLINE_PRIORITY


def is_low_priority(priority: int) -> bool:
    return priority > ONLINE_PRIORITY


class PriorityGate:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.online_waiting = 0
        """Online requests at this router waiting for a worker."""
        self.active = 0
        """Low-priority requests let through and not yet left."""
        self._queue: list[tuple[int, int, asyncio.Event]] = []  # a heap by (priority, arrival)
        self._arrivals = itertools.count()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def enter(self, priority: int) -> None:
        """Return once there is spare capacity for this request and it is first in line."""
        entry = (priority, next(self._arrivals), asyncio.Event())
        heapq.heappush(self._queue, entry)
        self._wake()
        try:
            while not (self._open() and self._queue[0] is entry):
                entry[2].clear()
                await entry[2].wait()
        except BaseException:
            self._queue.remove(entry)
            heapq.heapify(self._queue)
            self._wake()
            raise
        heapq.heappop(self._queue)
        self.active += 1
        self._wake()  # room may be left for the next one

    def leave(self) -> None:
        self.active -= 1
        self._wake()

    def online_wait_started(self) -> None:
        self.online_waiting += 1

    def online_wait_ended(self) -> None:
        self.online_waiting -= 1
        self._wake()

    def _open(self) -> bool:
        return self.online_waiting == 0 and self.active < self.limit

    def _wake(self) -> None:
        if self._queue and self._open():
            self._queue[0][2].set()
