"""What the router's and the workers' Prometheus metrics share: bucket layouts and the /metrics HTTP server.

Every metrics object (`router.metrics.RouterMetrics`, `cluster.worker_metrics.WorkerMetrics`) keeps its metrics in a
`CollectorRegistry` of its own, never prometheus_client's global one, so several objects in one process (unit tests,
workers in one process) do not collide. `serve_metrics` serves one registry on 127.0.0.1:

    server = serve_metrics(metrics.registry, 0)   # 0: a free port, read back from the bound socket
    server.address                                # "127.0.0.1:40123"; GET /metrics there
    server.stop()
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

METRICS_HOST = "127.0.0.1"

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
                   0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0)
"""Seconds, about 1.5x apart from 0.5 ms to 60 s: fits a GPU's millisecond steps and a CPU model's second-long
prefills alike (with +Inf above)."""

TOKEN_BUCKETS = tuple(float(2**i) for i in range(18))
"""Token counts 1, 2, 4, .. 131072."""

BATCH_BUCKETS = tuple(float(2**i) for i in range(11))
"""Requests per step 1, 2, 4, .. 1024."""


@dataclass
class MetricsServer:
    """A registry's /metrics, served on its own daemon thread."""

    host: str
    port: int
    """The bound port (the picked one when asked for 0)."""
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, port: int = 0, host: str = METRICS_HOST) -> MetricsServer:
    """Serve `registry` at http://host:port/metrics; port 0 picks a free one. OSError if the port is taken."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_port
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(host, bound, server, thread)
