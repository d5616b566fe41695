"""A worker's prefix-cache events on their way to the registry (`registry.kv_events`), for KV-aware routers.

The engine thread `add`s what its block manager cached and evicted after each step; the heartbeat thread `flush`es
it as one batch a beat. The first batch resets the worker's entry in every router's index and lists the blocks its
engine already holds (an engine kept through a role switch has some). Redis away: events wait here, up to
`MAX_PENDING` hashes; beyond that the oldest are dropped and the next batch is a reset with the engine's whole
cache, taken on the engine thread (`snapshot`), so a router's view heals once Redis is back.
"""

from __future__ import annotations

import logging
import threading

import redis

from pdserve.engine.block_manager import BlockManager
from pdserve.registry.kv_events import CacheBatch, KVEventLog

log = logging.getLogger(__name__)

MAX_PENDING = 500_000
"""Hashes kept while Redis is away (8 bytes each)."""


class CacheEventPublisher:
    def __init__(self, worker_id: str, log_: KVEventLog) -> None:
        self.worker_id = worker_id
        self._log = log_
        self._lock = threading.Lock()
        self._stored: list[int] = []
        self._evicted: list[int] = []
        self._reset_due = True
        """The next batch must be a reset carrying the whole cache (at start, and after events were dropped)."""
        self._reset_ready = False
        self._failing = False

    # ---- on the engine thread --------------------------------------------------------------------------------
    def add(self, blocks: BlockManager) -> None:
        """Take what `blocks` cached and evicted since the last call (after every engine cycle)."""
        blocks.record_events = True
        events = blocks.take_events()
        with self._lock:
            if self._reset_due and not self._reset_ready:
                self._stored, self._evicted = blocks.cached_hashes(), []  # the snapshot includes these events
                self._reset_ready = True
                return
            if events:
                self._stored.extend(events.stored)
                self._evicted.extend(events.evicted)
                self._bound()

    # ---- on the heartbeat thread -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Publish what gathered since the last flush as one batch (nothing when nothing did)."""
        with self._lock:
            if self._reset_due and not self._reset_ready:
                return  # the engine thread has not taken its snapshot yet
            if not (self._stored or self._evicted or self._reset_due):
                return
            batch = CacheBatch(self.worker_id, tuple(self._stored), tuple(self._evicted), self._reset_due)
            self._stored, self._evicted = [], []
            self._reset_due = self._reset_ready = False
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
        with self._lock:
            self._stored[:0] = batch.stored
            self._evicted[:0] = batch.evicted
            self._reset_due = self._reset_due or batch.reset
            self._reset_ready = self._reset_ready or batch.reset
            self._bound()

    def _bound(self) -> None:
        """Too much waiting for Redis: drop it all and send the whole cache once Redis is back."""
        if len(self._stored) + len(self._evicted) > MAX_PENDING:
            self._stored, self._evicted = [], []
            self._reset_due, self._reset_ready = True, False
