"""Each attempt's events, by its request key: what the router collects from the decode workers goes to the stream
of the attempt it belongs to, and a worker that is lost ends the streams on it.

Events may arrive before their stream opens: a request taken over from another router has its next events posted
to this router while the worker's answer to `adopt` is still on the way. They wait, PARK_S at most, for their
stream to open (events of a stream already closed wait too, then go).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pdserve.engine.request import FinishReason
from pdserve.worker.messages import TokenEvent

PARK_S = 30.0


@dataclass
class _Stream:
    worker_id: str
    queue: asyncio.Queue[TokenEvent] = field(default_factory=asyncio.Queue)


class EventStreams:
    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._streams: dict[str, _Stream] = {}
        self._parked: dict[str, tuple[float, list[TokenEvent]]] = {}

    def open(self, key: str, worker_id: str, first: Iterable[TokenEvent] = ()) -> None:
        """Start collecting `key`'s events from `worker_id`, after `first` (and any that arrived early)."""
        stream = self._streams[key] = _Stream(worker_id)
        _, early = self._parked.pop(key, (0.0, []))
        for event in (*first, *early):
            stream.queue.put_nowait(event)

    def close(self, key: str) -> None:
        self._streams.pop(key, None)

    async def next(self, key: str) -> TokenEvent:
        return await self._streams[key].queue.get()

    def deliver(self, events: Iterable[TokenEvent]) -> None:
        now = self.clock()
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is not None:
                stream.queue.put_nowait(event)
            else:
                self._parked.setdefault(event.request_id, (now, []))[1].append(event)
        for key in [k for k, (since, _) in self._parked.items() if now - since > PARK_S]:
            del self._parked[key]

    def lost(self, worker_id: str, reason: str) -> None:
        """`worker_id` is gone: every stream on it ends with an error."""
        for key, stream in self._streams.items():
            if stream.worker_id == worker_id:
                stream.queue.put_nowait(TokenEvent(key, finish_reason=FinishReason.ABORT,
                                                   error=f"worker lost ({reason})"))

    def __len__(self) -> int:
        return len(self._streams)
