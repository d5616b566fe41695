"""The fleet in the router's Prometheus metrics: how many workers each role has, and the machine time they hold.

    pdserve_workers{role, state}          gauge    workers in the registry now (state: starting, ready, draining;
                                                   role: prefill, decode, both)
    pdserve_worker_seconds_total{role}    counter  seconds of worker time held since this router started, summed
                                                   over workers in every state (what the fleet pays for)

The router's membership refresh (every 0.5 s) calls `observe` with the registry's workers; the counter adds each
role's count times the time since the last refresh. With several routers each counts the same fleet: sum over one
router (`max by (role)`), not over all of them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from pdserve.registry.entries import Role, WorkerInfo, WorkerState

ROLES = tuple(role.value for role in Role)
STATES = tuple(state.value for state in WorkerState if state is not WorkerState.STOPPED)
MAX_GAP_S = 5.0
"""A refresh later than this after the last one (Redis away, the process paused) adds only this much: the counts
in between are unknown."""


class FleetMetrics:
    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._counts: Counter[tuple[str, str]] = Counter()
        self._seconds: Counter[str] = Counter()
        self._last: float | None = None

    def observe(self, workers: Iterable[WorkerInfo]) -> None:
        """The registry's workers now."""
        now = self._clock()
        if self._last is not None:
            elapsed = min(now - self._last, MAX_GAP_S)
            for (role, _), count in self._counts.items():
                self._seconds[role] += count * elapsed
        self._last = now
        self._counts = Counter((w.role.value, w.state.value) for w in workers if w.state is not WorkerState.STOPPED)

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's Collector protocol."""
        workers = GaugeMetricFamily("pdserve_workers", "Workers in the registry, by role and state.",
                                    labels=["role", "state"])
        for role in ROLES:
            for state in STATES:
                workers.add_metric([role, state], self._counts[(role, state)])
        yield workers
        seconds = CounterMetricFamily("pdserve_worker_seconds", "Seconds of worker time held (any state), by role, "
                                      "since this router started.", labels=["role"])
        for role in ROLES:
            seconds.add_metric([role], self._seconds[role])
        yield seconds
