"""The router's Prometheus metrics: every request's latencies and sizes as the client saw them, and how it ended.

Fed by the orchestrator: `finished` with a finished request's `Timings` (from `records`, the same figures that go to
the registry's timings stream), `failed` when a request ends without a finish reason, `inter_token` per response
carrying tokens. Requests in flight are read at scrape time from a callable the orchestrator passes in.

    pdserve_time_to_first_token_seconds        histogram  accepted -> first token sent
    pdserve_time_per_output_token_seconds      histogram  (last token - first token) / (tokens - 1), requests of 2+
    pdserve_inter_token_latency_seconds        histogram  gap between consecutive responses carrying tokens
    pdserve_e2e_request_latency_seconds        histogram  accepted -> finished
    pdserve_request_queue_time_seconds         histogram  accepted -> prefill started (router wait + worker queue)
    pdserve_request_prefill_time_seconds       histogram  the prefill itself
    pdserve_request_kv_transfer_time_seconds   histogram  prefill done -> decoding (disaggregated only)
    pdserve_request_prompt_tokens              histogram  input tokens per finished request
    pdserve_request_generation_tokens          histogram  output tokens per finished request
    pdserve_requests_total{outcome}            counter    stop | length | abort (finish reasons) or invalid |
                                                          duplicate | overloaded | unavailable | cancelled | error |
                                                          taken_over (ended early; taken_over: its client
                                                          reconnected to another router, which went on with it)
    pdserve_request_migrations_total           counter    requests resumed on other workers after a worker failed
    pdserve_request_hand_ons_total             counter    requests a decode worker leaving its pool handed on
    pdserve_request_resumes_total{how}         counter    requests a client reconnected with (after its stream
                                                          broke): taken_over from the worker still running them,
                                                          or rerun from the tokens the client had
    pdserve_requests_in_flight                 gauge      accepted and not yet ended
    pdserve_requests_waiting_for_room          gauge      accepted, not yet sent to a worker (choosing one, or
                                                          waiting for a decode worker with free KV blocks)
    pdserve_workers{role,state}                gauge      workers in the registry (`router.fleet_metrics`)
    pdserve_worker_seconds_total{role}         counter    worker time held, any state (`router.fleet_metrics`)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.router.errors import DuplicateRequest, Overloaded, TakenOver, Unavailable, WorkerError
from pdserve.router.fleet_metrics import FleetMetrics
from pdserve.router.request_builder import InvalidRequest
from pdserve.router.timings import Timings
from pdserve.worker.metrics_server import LATENCY_BUCKETS, TOKEN_BUCKETS, MetricsServer, serve_metrics

RESUMES = ("taken_over", "rerun")
OUTCOMES = ("stop", "length", "abort", "invalid", "duplicate", "overloaded", "unavailable", "cancelled", "error",
            "taken_over")

_ERROR_KINDS = {InvalidRequest: "invalid", DuplicateRequest: "duplicate", Unavailable: "unavailable",
                Overloaded: "overloaded", WorkerError: "error", TakenOver: "taken_over",
                asyncio.CancelledError: "cancelled", GeneratorExit: "cancelled"}
"""Exception class -> outcome (anything else: error)."""


class RouterMetrics:
    def __init__(self, in_flight: Callable[[], int] | None = None) -> None:
        """`in_flight`: how many requests the router holds now, read at every scrape."""
        self.registry = CollectorRegistry()

        def latency(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, registry=self.registry, buckets=LATENCY_BUCKETS)

        self.ttft = latency("pdserve_time_to_first_token_seconds", "Accepted to first token sent to the client.")
        self.tpot = latency("pdserve_time_per_output_token_seconds",
                            "Per request: (last token - first token) / (tokens - 1); requests of 2+ tokens.")
        self.inter_token = latency("pdserve_inter_token_latency_seconds",
                                   "Gap between consecutive responses carrying tokens to one client.")
        self.e2e = latency("pdserve_e2e_request_latency_seconds", "Accepted to finished.")
        self.queue = latency("pdserve_request_queue_time_seconds",
                             "Accepted to prefill started: waiting at the router for room plus the worker's queue.")
        self.prefill = latency("pdserve_request_prefill_time_seconds", "The request's prefill on its worker.")
        self.kv_transfer = latency("pdserve_request_kv_transfer_time_seconds",
                                   "Prefill done to decoding started (the KV handoff; disaggregated only).")
        self.prompt_tokens = Histogram("pdserve_request_prompt_tokens", "Input tokens per finished request.",
                                       registry=self.registry, buckets=TOKEN_BUCKETS)
        self.generation_tokens = Histogram("pdserve_request_generation_tokens", "Output tokens per finished request.",
                                           registry=self.registry, buckets=TOKEN_BUCKETS)
        self.requests = Counter("pdserve_requests", "Requests ended, by outcome: the finish reason, or the error kind.",
                                ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)  # every outcome shows, at 0 until it happens
        self.migrations = Counter("pdserve_request_migrations", "Requests resumed on other workers after a worker "
                                  "failed (prompt plus the tokens already sent, prefilled again).",
                                  registry=self.registry)
        self.hand_ons = Counter("pdserve_request_hand_ons", "Requests a decode worker leaving its pool (a move or a "
                                "removal) handed on, resumed on other workers the same way.", registry=self.registry)
        self.resumes = Counter("pdserve_request_resumes", "Requests a client reconnected with after its stream "
                               "broke: taken over from the worker still running them, or run again from the tokens "
                               "the client had.", ["how"], registry=self.registry)
        for how in RESUMES:
            self.resumes.labels(how=how)
        self.in_flight = Gauge("pdserve_requests_in_flight", "Requests accepted and not yet ended.",
                               registry=self.registry)
        if in_flight is not None:
            self.in_flight.set_function(in_flight)
        self.waiting = Gauge("pdserve_requests_waiting_for_room",
                             "Requests not yet sent to a worker: choosing one, or waiting for free KV blocks.",
                             registry=self.registry)
        self.fleet = FleetMetrics()
        self.registry.register(self.fleet)

    def finished(self, timings: Timings, outcome: str, prompt_tokens: int, generation_tokens: int) -> None:
        """A request ended with a finish reason (`outcome` is its value: stop, length, abort)."""
        self.requests.labels(outcome=outcome).inc()
        if generation_tokens:
            self.ttft.observe(timings.ttft_s)
        if generation_tokens > 1:
            self.tpot.observe(timings.tpot_s)
        self.e2e.observe(timings.e2e_s)
        self.queue.observe(timings.queue_s)
        self.prefill.observe(timings.prefill_s)
        if timings.kv_transfer_s:
            self.kv_transfer.observe(timings.kv_transfer_s)
        self.prompt_tokens.observe(prompt_tokens)
        self.generation_tokens.observe(generation_tokens)

    def failed(self, error: BaseException) -> None:
        """A request ended without a finish reason, by `error` (a client that went away counts as cancelled)."""
        outcome = next((kind for cls, kind in _ERROR_KINDS.items() if isinstance(error, cls)), "error")
        self.requests.labels(outcome=outcome).inc()


def start_router_metrics(metrics: RouterMetrics, port: int) -> MetricsServer:
    """Serve the router's metrics on 127.0.0.1:`port` (0: a free port)."""
    try:
        return serve_metrics(metrics.registry, port)
    except OSError as e:
        raise OSError(f"router.metrics_port: cannot serve metrics on 127.0.0.1:{port}: {e}") from e
