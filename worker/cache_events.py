"""A worker's prefix-cache events on their way to the registry (`registry.kv_events`), for KV-aware routers.

The engine thread `add`s what its block manager cached and evicted after each engine cycle; the heartbeat thread
`flush`es it as one batch a beat. Each hash travels by its latest change only (cached or evicted), so a batch never
says both of one hash. The first batch resets the worker's entry in every router's index and lists the blocks its
engine already holds (an engine kept through a role switch has some). Redis away: changes wait here, up to
`MAX_PENDING` hashes; beyond that they are dropped and the next batch is a reset with the engine's whole cache, taken
on the engine thread at its next `add`, so a router's view heals once Redis is back.
"""

from __future__ import annotations

import logging
import threading

import redis

from pdserve.engine.block_manager import BlockManager
from pdserve.registry.kv_events import CacheBatch, KVEventLog

log = logging.getLogger(__name__)

MAX_PENDING = 500_000
"""Hashes kept while Redis is away."""


class CacheEventPublisher:
    def __init__(self, worker_id: str, log_: KVEventLog) -> None:
        self.worker_id = worker_id
        self._log = log_
        self._lock = threading.Lock()
        self._pending: dict[int, bool] = {}
        """Hash -> cached (True) or evicted (False): its latest change not yet published."""
        self._reset_due = True
        """The next batch must be a reset carrying the whole cache (at start, and after changes were dropped)."""
        self._snapshot_taken = False
        """The reset's snapshot is in `_pending` (taken by `add` on the engine thread)."""
        self._failing = False

    # ---- on the engine thread --------------------------------------------------------------------------------
    def add(self, blocks: BlockManager) -> None:
        """Take what `blocks` cached and evicted since the last call (after every engine cycle)."""
        blocks.record_events = True
        events = blocks.take_events()
        with self._lock:
            if self._reset_due and not self._snapshot_taken:
                self._pending = dict.fromkeys(blocks.cached_hashes(), True)  # includes `events`
                self._snapshot_taken = True
                return
            for block_hash in events.stored:
                self._pending[block_hash] = True
            for block_hash in events.evicted:
                self._pending[block_hash] = False
            self._bound()

    # ---- on the heartbeat thread -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Publish what gathered since the last flush as one batch (nothing when nothing did)."""
        with self._lock:
            if self._reset_due and not self._snapshot_taken:
                return  # the engine thread has not taken its snapshot yet
            if not (self._pending or self._reset_due):
                return
            batch = CacheBatch(self.worker_id, tuple(h for h, cached in self._pending.items() if cached),
                               tuple(h for h, cached in self._pending.items() if not cached), self._reset_due)
            self._pending = {}
            self._reset_due = self._snapshot_taken = False
        try:
            self._log.publish(batch)
        except redis.RedisError as e:
            if not self._failing:
                log.warning("cache events of %s not published (will retry): %s", self.worker_id, e)
            self._failing = True
            self._put_back(batch)
            return
        self._failing = False

    def _put_back(self, batch: CacheBatch) -> None:
        """A batch that was not published goes back under the changes made since (which are newer)."""
        with self._lock:
            if self._reset_due:
                return  # changes were dropped meanwhile: a fresh snapshot replaces this batch
            for block_hash in batch.stored:
                self._pending.setdefault(block_hash, True)
            for block_hash in batch.evicted:
                self._pending.setdefault(block_hash, False)
            self._reset_due = self._snapshot_taken = batch.reset
            self._bound()

    def _bound(self) -> None:
        """Too much waiting for Redis: drop it all and send the whole cache once Redis is back."""
        if len(self._pending) > MAX_PENDING:
            self._pending = {}
            self._reset_due, self._snapshot_taken = True, False
