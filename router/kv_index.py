"""Which worker holds which KV blocks, as a router knows it from the workers' prefix-cache events (KV-aware routing).

    index = KVIndex()
    index.apply(batch)                                # a `CacheBatch` from the `kv_events` stream
    index.cached_blocks(hashes, ["decode-0", ...])    # leading blocks of a prompt each worker holds
    await KVIndexFollower(index, log).run()           # rebuild from the stream's start, then follow it

The index is a hint, never a promise: a block may be evicted after its event was read, and events may be missing
(a trimmed stream, Redis away). The routing cost uses it; what is actually reused is decided by the workers
themselves (a decode worker's reservation, a prefill worker's own cache).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence

import redis

from pdserve.registry.kv_events import FIRST_ID, CacheBatch, KVEventLog

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000
"""A follower's read waits this long for new batches (in a thread, off the event loop)."""
RETRY_S = 1.0


class KVIndex:
    def __init__(self) -> None:
        self._workers_of: dict[int, set[str]] = defaultdict(set)
        self._hashes_of: dict[str, set[int]] = defaultdict(set)
        self.batches_applied = 0

    def apply(self, batch: CacheBatch) -> None:
        if batch.reset:
            self.forget(batch.worker_id)
        held = self._hashes_of[batch.worker_id]
        for block_hash in batch.stored:
            held.add(block_hash)
            self._workers_of[block_hash].add(batch.worker_id)
        for block_hash in batch.evicted:
            held.discard(block_hash)
            self._drop(block_hash, batch.worker_id)
        self.batches_applied += 1

    def forget(self, worker_id: str) -> None:
        """Drop every block of a worker (it restarted, or left the cluster)."""
        for block_hash in self._hashes_of.pop(worker_id, ()):
            self._drop(block_hash, worker_id)

    def cached_blocks(self, hashes: Sequence[int], workers: Iterable[str]) -> dict[str, int]:
        """For each of `workers`, how many leading blocks of a prompt (named by `hashes`) it holds."""
        counts = dict.fromkeys(workers, 0)
        still = set(counts)
        for depth, block_hash in enumerate(hashes, start=1):
            still &= self._workers_of.get(block_hash, set())
            if not still:
                break
            for worker_id in still:
                counts[worker_id] = depth
        return counts

    @property
    def num_blocks(self) -> int:
        return len(self._workers_of)

    def _drop(self, block_hash: int, worker_id: str) -> None:
        workers = self._workers_of.get(block_hash)
        if workers is not None:
            workers.discard(worker_id)
            if not workers:
                del self._workers_of[block_hash]


class KVIndexFollower:
    """Keeps a `KVIndex` up to date: reads the event stream from its start (a router that starts or restarts
    rebuilds its index so), then follows it. Redis away: the index stays as it is and the read is retried."""

    def __init__(self, index: KVIndex, events: KVEventLog) -> None:
        self.index = index
        self.events = events
        self.last_id = FIRST_ID
        self._failing = False

    async def run(self) -> None:
        while True:
            await self.read_once(READ_BLOCK_MS)

    async def read_once(self, block_ms: int | None = None) -> int:
        """Apply the next batches (waiting up to `block_ms` for some); how many were applied."""
        try:
            self.last_id, batches = await asyncio.to_thread(self.events.read, self.last_id, 1000, block_ms)
        except redis.RedisError as e:
            if not self._failing:
                log.warning("KV events unreadable, keeping the index as it is: %s", e)
            self._failing = True
            await asyncio.sleep(RETRY_S)
            return 0
        self._failing = False
        for batch in batches:
            self.index.apply(batch)
        return len(batches)
