"""Every worker's Prometheus metrics, gathered by the router and served as one exposition (HTTP /metrics/workers).

Each worker also serves its own /metrics on its node's loopback, which Prometheus cannot reach on a multi-node or
Kubernetes cluster; through the router one scrape target covers them all. The workers' families are fetched over
Ray (no extra port), merged by name (every sample keeps its `worker_id` and `role` labels) and written once, as the
text format requires. A worker that does not answer within SCRAPE_TIMEOUT_S is left out of that scrape (and counted
in `pdserve_worker_scrape_failures`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 5.0


class _Families:
    """A collector that yields fixed families (prometheus_client writes only what a registry collects)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


async def scrape_workers(handles: dict[str, object]) -> bytes:
    """The text exposition of every worker in `handles` (worker id -> actor handle with a `metrics` method)."""
    ids = list(handles)
    answers = await asyncio.gather(*(asyncio.wait_for(handles[i].metrics.remote(), SCRAPE_TIMEOUT_S) for i in ids),
                                   return_exceptions=True)
    merged: dict[str, Metric] = {}
    failures = 0
    for worker_id, answer in zip(ids, answers):
        if isinstance(answer, BaseException):
            log.info("worker %s left out of the metrics scrape: %s", worker_id, type(answer).__name__)
            failures += 1
            continue
        for family in answer:
            if family.name in merged:
                merged[family.name].samples.extend(family.samples)
            else:
                merged[family.name] = family
    failed = GaugeMetricFamily("pdserve_worker_scrape_failures", "Workers that did not answer this scrape.",
                               value=failures)
    registry = CollectorRegistry()
    registry.register(_Families([*merged.values(), failed]))
    return generate_latest(registry)
