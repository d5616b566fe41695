"""Every finished request's timings: into the router's metrics at once, and onto the registry's timings stream (the
controller's window, `pdserve status`) from a thread of their own, so a slow or absent Redis never stalls a stream.

At most MAX_PENDING entries wait for Redis; beyond that the oldest are dropped (and counted), never the router's
memory.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

import redis

from pdserve.engine.request import FinishReason
from pdserve.registry.registry import Registry
from pdserve.router.metrics import RouterMetrics
from pdserve.router.request_builder import ValidRequest
from pdserve.router.timings import RequestClock, Timings

log = logging.getLogger(__name__)

MAX_PENDING = 10_000


class TimingRecords:
    def __init__(self, registry: Registry | None, metrics: RouterMetrics) -> None:
        """`registry`: None keeps the metrics only (unit tests)."""
        self.registry = registry
        self.metrics = metrics
        self.dropped = 0
        self._pending: deque[dict[str, str | int | float]] = deque()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def record(self, request: ValidRequest, clock: RequestClock, finish: FinishReason, timings: Timings,
               workers: str) -> None:
        self.metrics.finished(timings, finish.value, len(request.token_ids), clock.tokens)
        if self.registry is None:
            return
        fields = {"request_id": request.request_id, "prompt_tokens": len(request.token_ids),
                  "completion_tokens": clock.tokens, "finish_reason": finish.value, "workers": workers,
                  **timings.as_fields()}
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(fields)
        self._ready.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._write, name="timings", daemon=True)
            self._thread.start()

    def _write(self) -> None:
        failing = False
        while True:
            self._ready.wait()
            with self._lock:
                fields = self._pending.popleft() if self._pending else None
                if not self._pending:
                    self._ready.clear()
            if fields is None:
                continue
            try:
                self.registry.append_timings(fields)
                failing = False
            except redis.RedisError as e:  # the entry is lost; serving goes on
                if not failing:
                    log.warning("timings not recorded (Redis: %s); more may be lost until it answers", e)
                failing = True
