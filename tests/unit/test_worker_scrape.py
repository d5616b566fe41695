"""The router's gathering of worker metrics: families merged by name, one TYPE line each, every worker's samples
kept, a worker that does not answer left out and counted (real WorkerMetrics registries, fake actor handles)."""

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from pdserve.worker.metrics import WorkerMetrics


class Handle:
    """Stands in for a Ray actor handle: `handle.metrics.remote()` is awaitable."""

    def __init__(self, metrics: WorkerMetrics | None) -> None:
        self.metrics = self
        self._metrics = metrics

    def remote(self):
        async def answer():
            if self._metrics is None:
                raise ConnectionError("actor gone")
            return list(self._metrics.registry.collect())
        return answer()


def test_every_workers_samples_under_one_family_and_the_silent_one_counted():
    from pdserve.router.worker_scrape import scrape_workers

    prefill, decode = WorkerMetrics("prefill-0", "prefill", lambda: None), WorkerMetrics("decode-0", "decode",
                                                                                         lambda: None)
    text = asyncio.run(scrape_workers({"prefill-0": Handle(prefill), "decode-0": Handle(decode),
                                       "decode-1": Handle(None)})).decode()
    assert sum(1 for line in text.splitlines() if line.startswith("# TYPE pdserve_worker_step_seconds ")) == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    steps = families["pdserve_worker_step_seconds"]
    assert {s.labels["worker_id"] for s in steps.samples} == {"prefill-0", "decode-0"}
    assert families["pdserve_worker_scrape_failures"].samples[0].value == 1
