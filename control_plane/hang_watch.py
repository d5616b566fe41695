"""Which workers are hung: alive as far as Ray knows, but serving nothing.

A worker is hung when, for `workers.hung_after_s`,

- its actor has not answered `info` (the process is stopped, swapping, or its event loop is blocked), or
- its engine thread has been inside one cycle (a step, or a command between steps) while it answers (a step that
  never returns: a deadlock, a hung device).

The pool's watch (`control_plane.worker_pool`) asks every worker for its `info` each round and tells this class what
came back; a hung worker is then killed and replaced like a dead one, and the routers resume its requests elsewhere
(its actor's death ends their event streams). A worker still starting is never judged (loading a model may take
minutes: `WORKER_START_TIMEOUT_S` bounds that).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pdserve.registry.entries import WorkerInfo


class HangWatch:
    def __init__(self, hung_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.hung_after_s = hung_after_s
        self._clock = clock
        self._answered: dict[str, float] = {}
        """When each watched worker last answered with an engine that was making progress."""

    def watch(self, worker_id: str) -> None:
        """Judge `worker_id` from now on (it has started); the clock starts now."""
        self._answered[worker_id] = self._clock()

    def forget(self, worker_id: str) -> None:
        self._answered.pop(worker_id, None)

    def watched(self, worker_id: str) -> bool:
        return worker_id in self._answered

    def answered(self, worker_id: str, info: WorkerInfo) -> None:
        """`worker_id`'s actor answered `info`: it is alive, and its engine has progressed until `info.engine_stalled_s`
        ago."""
        if worker_id in self._answered:
            self._answered[worker_id] = max(self._answered[worker_id], self._clock() - info.engine_stalled_s)

    def hung(self) -> dict[str, float]:
        """The workers that made no progress for `hung_after_s`: worker id -> seconds without progress."""
        now = self._clock()
        silent = {worker_id: now - since for worker_id, since in self._answered.items()}
        return {worker_id: seconds for worker_id, seconds in silent.items() if seconds >= self.hung_after_s}

    def ask_timeout_s(self, longest_s: float) -> float:
        """How long one round may wait for an answer: short enough that a hung worker is found within about
        `hung_after_s`, at most `longest_s`."""
        return max(0.5, min(longest_s, self.hung_after_s / 4))
