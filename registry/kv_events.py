"""The cluster's prefix-cache events in Redis: which worker cached or evicted which KV blocks (for KV-aware routing).

A stream, `pdserve:<cluster>:kv_events`. Each entry is one batch from one worker (a heartbeat's worth): the hashes of
the blocks it cached and of those it evicted since its last batch, in order, packed as little-endian uint64 bytes. A
batch with `reset` says "forget everything of this worker, then apply this": a worker sends one when it starts (its
cache is new, or it took over an engine in a role switch and lists what that engine holds) and after it lost events
(Redis away too long). A router rebuilds its index by reading the stream from the start, then follows it.

The stream is trimmed to about `KV_EVENTS_MAXLEN` batches; a router that rebuilds after older batches were trimmed
knows less than the workers hold, which only costs cache hits, never correctness: a decode worker reports what it
really holds when it reserves (`Reservation.cached_blocks`), and a prefill worker computes what it lacks.

Every call is blocking: callers on an event loop run them in a thread.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import redis

KV_EVENTS_MAXLEN = 200_000
FIRST_ID = "0-0"
"""Read from the stream's start."""


@dataclass(frozen=True)
class CacheBatch:
    worker_id: str
    stored: tuple[int, ...] = ()
    evicted: tuple[int, ...] = ()
    reset: bool = False
    """Forget every block of this worker before applying the batch."""


class KVEventLog:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        """`client` and `prefix`: a `Registry`'s (`registry.redis`, `registry.prefix`)."""
        self.redis = client
        self.key = f"{prefix}:kv_events"

    def publish(self, batch: CacheBatch) -> None:
        self.redis.xadd(self.key, {"worker": batch.worker_id, "stored": _pack(batch.stored),
                                   "evicted": _pack(batch.evicted), "reset": int(batch.reset)},
                        maxlen=KV_EVENTS_MAXLEN, approximate=True)

    def read(self, after: str = FIRST_ID, count: int = 1000, block_ms: int | None = None,
             ) -> tuple[str, list[CacheBatch]]:
        """Batches after stream id `after` (at most `count`; waits up to `block_ms` for one when given), and the id
        to read after next time."""
        answer = self.redis.xread({self.key: after}, count=count, block=block_ms)
        batches = []
        for _, entries in answer or ():
            for entry_id, fields in entries:
                after = entry_id.decode()
                batches.append(CacheBatch(fields[b"worker"].decode(), _unpack(fields[b"stored"]),
                                          _unpack(fields[b"evicted"]), fields[b"reset"] == b"1"))
        return after, batches


def _pack(hashes: Sequence[int]) -> bytes:
    values = array("Q", hashes)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def _unpack(data: bytes) -> tuple[int, ...]:
    values = array("Q")
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    return tuple(values)
