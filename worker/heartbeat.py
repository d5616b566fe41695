"""A worker's heartbeat: its `WorkerInfo` written to the registry every second, on its own thread, and after it
the worker's prefix-cache events (`worker.cache_events`).

Every Redis call is on that thread (the first beat, and the removal of the entry when the worker stops), never on
the worker's event loop. Redis being away is logged and retried, never fatal: serving goes on and the registry
refills once it is back. Any other error in a beat is logged with its stack and the thread goes on (it used to end
silently, and the worker then dropped out of the registry while it served).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from pdserve.registry.entries import WorkerInfo
from pdserve.registry.registry import HEARTBEAT_S, Registry
from pdserve.worker.cache_events import CacheEventPublisher

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, registry: Registry, info: Callable[[], WorkerInfo],
                 cache_events: CacheEventPublisher | None = None) -> None:
        """`cache_events`: flushed after every beat (a batch of prefix-cache events a second)."""
        self._registry = registry
        self._info = info
        self._cache_events = cache_events
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._failing = False

    def start(self) -> None:
        """The thread beats at once, then every HEARTBEAT_S (no Redis call on the caller's thread: a hung Redis
        must not stall a worker's event loop)."""
        self._thread.start()

    def beat(self) -> None:
        info = self._info()
        try:
            self._registry.heartbeat(info)
        except redis.RedisError as e:
            if not self._failing:
                log.warning("heartbeat of %s failed (will retry): %s", info.worker_id, e)
            self._failing = True
        else:
            self._failing = False

    def stop(self) -> None:
        """Stop beating; the thread removes the registry entry on its way out, after its last beat (so no beat in
        flight can write the entry again), and without holding up the caller."""
        self._stopping.set()

    def _run(self) -> None:
        self._beat_and_flush()
        while not self._stopping.wait(HEARTBEAT_S):
            self._beat_and_flush()
        info = self._info()
        try:
            self._registry.remove(info.worker_id)
        except redis.RedisError as e:  # its entry expires on its own (TTL)
            log.warning("could not remove %s from the registry: %s", info.worker_id, e)

    def _beat_and_flush(self) -> None:
        try:
            self.beat()
            if self._cache_events is not None:
                self._cache_events.flush()
        except Exception:  # a bug, not Redis (beat and flush handle that): logged, and the next beat tries again
            log.exception("heartbeat failed; it goes on")
