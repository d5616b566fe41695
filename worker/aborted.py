"""The requests a worker was told to abort, remembered for a while so that work for them arriving late is refused.

A router sends a request's work (reserve, prefill, generate) and, when its client goes away, the abort, each as its
own Ray call. Ray runs an async actor's calls concurrently and does not promise to start them in the order they were
sent (a call whose arguments are still being fetched waits while a later one runs), so an abort can be run before
the work it cancels. Without a record of it the work would then start for nobody: a decode worker's reservation
would hold its blocks forever, as no KV and no second abort ever comes. Request keys are never reused (each attempt
has its own), so a key aborted once stays aborted; the record is kept for `keep_s` and then dropped.

Everything here runs on the worker's event loop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

KEEP_S = 600.0
"""Longer than any call can wait in Ray's queues before it runs."""


class AbortedRequests:
    def __init__(self, keep_s: float = KEEP_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.keep_s = keep_s
        self.clock = clock
        self._when: OrderedDict[str, float] = OrderedDict()

    def add(self, request_id: str) -> None:
        self._forget_old()
        self._when[request_id] = self.clock()

    def __contains__(self, request_id: str) -> bool:
        self._forget_old()
        return request_id in self._when

    def __len__(self) -> int:
        self._forget_old()
        return len(self._when)

    def _forget_old(self) -> None:
        cutoff = self.clock() - self.keep_s
        while self._when and next(iter(self._when.values())) < cutoff:
            self._when.popitem(last=False)
