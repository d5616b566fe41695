"""Which worker holds which KV blocks, as a router knows it from the workers' prefix-cache events (KV-aware routing).

    index = KVIndex()
    index.apply(batch)                                # a `CacheBatch` from the `kv_events` stream
    index.expect("decode-0", hashes)                  # this router just sent it that prompt
    index.cached_blocks(hashes, ["decode-0", ...])    # leading blocks of a prompt each worker holds
    await KVIndexFollower(index, log).run()           # rebuild from the stream's start, then follow it

Events arrive a heartbeat (about a second) after the blocks are cached, so a router also `expect`s the blocks of each
prompt it routes on the workers it chose, for `EXPECT_S`: the next turn of a conversation sent at once still finds
the workers that served the last one. The index is a hint, never a promise: a block may be evicted after its event
was read, and events may be missing (a trimmed stream, Redis away). The routing cost uses it; what is actually reused
is decided by the workers themselves (a decode worker's reservation, a prefill worker's own cache).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import redis

from pdserve.registry.kv_events import FIRST_ID, CacheBatch, KVEventLog

log = logging.getLogger(__name__)

EXPECT_S = 5.0
"""How long blocks a router expects on a worker count as held without an event saying so."""
READ_BLOCK_MS = 1000
"""A follower's read waits this long for new batches (in a thread, off the event loop)."""
RETRY_S = 1.0
PRUNE_AFTER_S = 60.0
"""A worker the router no longer lists and that sent no batch for this long leaves the index."""
MAX_EXPECTED = 100_000
"""Past this many expected hashes, the expired ones are dropped."""


class KVIndex:
    def __init__(self) -> None:
        self._workers_of: dict[int, set[str]] = defaultdict(set)
        self._hashes_of: dict[str, set[int]] = defaultdict(set)
        self._expected: dict[int, dict[str, float]] = {}
        """Hash -> worker -> until when (monotonic seconds) it counts as held there, events or not."""
        self._last_batch: dict[str, float] = {}
        """Worker -> when its latest batch was applied (monotonic seconds)."""
        self.batches_applied = 0

    def apply(self, batch: CacheBatch, now: float | None = None) -> None:
        self._last_batch[batch.worker_id] = time.monotonic() if now is None else now
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
        self._last_batch.pop(worker_id, None)

    def prune(self, live: Iterable[str], quiet_s: float, now: float | None = None) -> list[str]:
        """Forget the workers that are not `live` and sent nothing for `quiet_s` (gone for good: a worker that is
        starting publishes before routers list it, so a fresh one is kept). Returns whom it forgot."""
        now = time.monotonic() if now is None else now
        live = set(live)
        gone = [w for w, at in self._last_batch.items() if w not in live and now - at > quiet_s]
        for worker_id in gone:
            self.forget(worker_id)
        return gone

    def expect(self, worker_id: str, hashes: Iterable[int], now: float | None = None) -> None:
        """A prompt with these block hashes was just sent to `worker_id`: count them as held there for `EXPECT_S`
        (its events will say so within a heartbeat, or say nothing if it never cached them)."""
        until = (time.monotonic() if now is None else now) + EXPECT_S
        for block_hash in hashes:
            self._expected.setdefault(block_hash, {})[worker_id] = until
        if len(self._expected) > MAX_EXPECTED:
            self._expire(time.monotonic() if now is None else now)

    def cached_blocks(self, hashes: Sequence[int], workers: Iterable[str],
                      now: float | None = None) -> dict[str, int]:
        """For each of `workers`, how many leading blocks of a prompt (named by `hashes`) it holds (or is expected
        to)."""
        now = time.monotonic() if now is None else now
        counts = dict.fromkeys(workers, 0)
        still = set(counts)
        for depth, block_hash in enumerate(hashes, start=1):
            expected = self._expected.get(block_hash, {})
            still &= self._workers_of.get(block_hash, set()) | {w for w, until in expected.items() if until > now}
            if not still:
                break
            for worker_id in still:
                counts[worker_id] = depth
        return counts

    @property
    def num_blocks(self) -> int:
        return len(self._workers_of)

    def _expire(self, now: float) -> None:
        for block_hash in list(self._expected):
            live = {w: until for w, until in self._expected[block_hash].items() if until > now}
            if live:
                self._expected[block_hash] = live
            else:
                del self._expected[block_hash]

    def _drop(self, block_hash: int, worker_id: str) -> None:
        workers = self._workers_of.get(block_hash)
        if workers is not None:
            workers.discard(worker_id)
            if not workers:
                del self._workers_of[block_hash]


class KVIndexFollower:
    """Keeps a `KVIndex` up to date: reads the event stream from its start (a router that starts or restarts
    rebuilds its index so), then follows it, and forgets workers that left (not `live` and quiet for PRUNE_AFTER_S).
    Redis away: the index stays as it is and the read is retried."""

    def __init__(self, index: KVIndex, events: KVEventLog) -> None:
        self.index = index
        self.events = events
        self.last_id = FIRST_ID
        self.live: Callable[[], Iterable[str]] | None = None
        """The workers the router knows now (its membership), for pruning; None prunes nothing."""
        self._failing = False

    async def run(self) -> None:
        pruned_at = time.monotonic()
        while True:
            await self.read_once(READ_BLOCK_MS)
            if self.live is not None and time.monotonic() - pruned_at > PRUNE_AFTER_S:
                pruned_at = time.monotonic()
                for worker_id in self.index.prune(self.live(), PRUNE_AFTER_S):
                    log.info("KV index: forgot %s (gone)", worker_id)

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
