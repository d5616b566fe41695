"""A worker's Prometheus metrics (labels `worker_id`, `role`): its load, its engine steps and its KV handoffs.

Fed on the engine thread: `step(engine, outputs, seconds)` after every step that ran (the engine thread's `on_step`)
and `transfer(result)` for every KV transfer outcome the worker polls. The load gauges cost nothing per step: they
read the engine thread's latest `EngineLoad` when scraped.

    pdserve_worker_requests_running / _waiting / _held   gauge      the engine's queues (held: prefilled and waiting
                                                                    for the handoff, or reserved for KV arriving)
    pdserve_worker_queued_prefill_tokens                  gauge      prompt tokens still to compute
    pdserve_worker_kv_blocks_used / _total                gauge      KV cache blocks
    pdserve_worker_step_seconds                           histogram  engine step duration
    pdserve_worker_step_requests                          histogram  requests per step (the batch size)
    pdserve_worker_prefill_tokens_total                   counter    prompt tokens computed
    pdserve_worker_decode_tokens_total                    counter    tokens decoded (one per decode step per request)
    pdserve_worker_preemptions_total                      counter    requests preempted (recomputed later)
    pdserve_worker_kv_transfers_total{status}             counter    KV transfers ended: done, failed (a "no KV"
                                                                    answer counts here on the decode side),
                                                                    cancelled, timed_out
    pdserve_worker_kv_transfer_seconds                    histogram  a finished handoff, start to done (sends on a
                                                                    prefill worker, receives on a decode worker)
    pdserve_worker_kv_transfer_bytes_total                counter    bytes of finished handoffs
    pdserve_worker_mfu / pdserve_worker_mbu               gauge      model FLOPs / bandwidth utilization per GPU

Step shape: when the engine keeps the step's `SchedulerOutput` as `engine.last_schedule`, requests and tokens are
exact (a chunk of one token for a request that has output is a decode; every other chunk is prefill). Without it they
are read off the step's outputs: a step counts when it sampled a token, its batch size is the requests that sampled,
and a prompt's tokens count as prefilled in the step that finishes its prefill (a chunked prompt's earlier chunks,
which sample nothing, are not seen apart).

MFU and MBU need the hardware's peak, which only a simulated engine knows (`engine.cost_model.hardware`): over the
last `window` steps that ran, MFU = sum(flops) / (sum(seconds) * peak_flops) and MBU = sum(bytes) / (sum(seconds) *
hbm_bytes_per_s), from the sim runner's `last_cost` (FLOPs and bytes of one GPU, so no tensor-parallel factor: every
rank does the same share), i.e. utilization while busy. A torch engine (CPU or GPU) has no known peak: the two
gauges stay unset (no samples).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.cluster.metrics import BATCH_BUCKETS, LATENCY_BUCKETS
from pdserve.engine.engine import Engine, EngineLoad
from pdserve.engine.request import RequestOutput
from pdserve.kv_transfer.connector import TransferResult, TransferStatus

LABELS = ("worker_id", "role")
MFU_WINDOW_STEPS = 32


class WorkerMetrics:
    def __init__(self, worker_id: str, role: str, load: Callable[[], EngineLoad | None],
                 window: int = MFU_WINDOW_STEPS) -> None:
        """`load`: the engine's latest load (None before it is built), read at every scrape."""
        self.registry = CollectorRegistry()
        self.labels = {"worker_id": worker_id, "role": role}
        for name, field, doc in (
                ("requests_running", "running", "Requests running (prefilling or decoding)."),
                ("requests_waiting", "waiting", "Requests waiting for their first step."),
                ("requests_held", "held", "Requests holding KV blocks outside the running set (handoff)."),
                ("queued_prefill_tokens", "queued_prefill_tokens", "Prompt tokens still to compute."),
                ("kv_blocks_used", "kv_blocks_used", "KV cache blocks in use."),
                ("kv_blocks_total", "kv_blocks_total", "KV cache blocks in all.")):
            self._gauge(f"pdserve_worker_{name}", doc).set_function(_reader(load, field))
        self._step_seconds = self._child(Histogram("pdserve_worker_step_seconds", "Engine step duration.", LABELS,
                                                   registry=self.registry, buckets=LATENCY_BUCKETS))
        self._step_requests = self._child(Histogram("pdserve_worker_step_requests", "Requests per engine step.",
                                                    LABELS, registry=self.registry, buckets=BATCH_BUCKETS))
        self._prefill_tokens = self._counter("pdserve_worker_prefill_tokens", "Prompt tokens computed.")
        self._decode_tokens = self._counter("pdserve_worker_decode_tokens", "Tokens decoded.")
        self._preemptions = self._counter("pdserve_worker_preemptions", "Requests preempted (recomputed later).")
        transfers = Counter("pdserve_worker_kv_transfers", "KV transfers ended, by status.", (*LABELS, "status"),
                            registry=self.registry)
        self._transfers = {s: transfers.labels(**self.labels, status=s.value) for s in TransferStatus}
        self._transfer_seconds = self._child(Histogram(
            "pdserve_worker_kv_transfer_seconds", "A finished KV handoff, start to done.", LABELS,
            registry=self.registry, buckets=LATENCY_BUCKETS))
        self._transfer_bytes = self._counter("pdserve_worker_kv_transfer_bytes", "Bytes of finished KV handoffs.")
        self._mfu = Gauge("pdserve_worker_mfu", "Model FLOPs utilization per GPU over recent steps (sim engines).",
                          LABELS, registry=self.registry)
        self._mbu = Gauge("pdserve_worker_mbu", "Model bandwidth utilization per GPU over recent steps (sim engines).",
                          LABELS, registry=self.registry)
        self._bound = False
        self._peak: tuple[float, float] | None = None
        """(peak FLOP/s, HBM bytes/s) of one GPU; None: unknown (a torch engine)."""
        self._preemptions_seen = 0
        self._last_cost: object = None
        self._window: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._sums = [0.0, 0.0, 0.0]
        """flops, bytes, seconds over the window."""
        self.mfu = 0.0
        self.mbu = 0.0

    # ---- on the engine thread --------------------------------------------------------------------------------
    def step(self, engine: Engine, outputs: Sequence[RequestOutput], seconds: float) -> None:
        """After a step that ran: `seconds` is how long `engine.step()` took."""
        if not self._bound:
            self._bind(engine)
        preempted = engine.preemptions_total - self._preemptions_seen
        if preempted:
            self._preemptions_seen += preempted
            self._preemptions.inc(preempted)
        shape = step_shape(engine, outputs)
        if shape is None:
            return  # nothing was scheduled
        requests, prefill_tokens, decode_tokens = shape
        self._step_seconds.observe(seconds)
        self._step_requests.observe(requests)
        if prefill_tokens:
            self._prefill_tokens.inc(prefill_tokens)
        if decode_tokens:
            self._decode_tokens.inc(decode_tokens)
        if self._peak is not None:
            self._utilization(engine.runner.last_cost)

    def transfer(self, result: TransferResult) -> None:
        """A KV transfer's outcome (from `connector.poll()`)."""
        self._transfers[result.status].inc()
        if result.status is TransferStatus.DONE and result.bytes:  # a "no KV" answer moves nothing
            self._transfer_seconds.observe(result.seconds)
            self._transfer_bytes.inc(result.bytes)

    # ---- internals -------------------------------------------------------------------------------------------
    def _bind(self, engine: Engine) -> None:
        """First step: learn whether the engine knows its hardware's peak (only a simulated one does)."""
        self._bound = True
        self._preemptions_seen = engine.preemptions_total
        if engine.config.simulated:
            hardware = engine.cost_model.hardware
            self._peak = (hardware.peak_flops, hardware.hbm_bytes_per_s)
            self._mfu.labels(**self.labels).set_function(lambda: self.mfu)
            self._mbu.labels(**self.labels).set_function(lambda: self.mbu)

    def _utilization(self, cost) -> None:
        """Slide the window by the step's modelled cost (FLOPs and bytes of one GPU, seconds)."""
        if cost is None or cost is self._last_cost:
            return
        self._last_cost = cost
        sums = self._sums
        if len(self._window) == self._window.maxlen:
            old_flops, old_bytes, old_seconds = self._window[0]
            sums[0] -= old_flops
            sums[1] -= old_bytes
            sums[2] -= old_seconds
        self._window.append((cost.flops, cost.bytes, cost.seconds))
        sums[0] += cost.flops
        sums[1] += cost.bytes
        sums[2] += cost.seconds
        peak_flops, peak_bytes = self._peak
        if sums[2] > 0:
            self.mfu = sums[0] / (sums[2] * peak_flops)
            self.mbu = sums[1] / (sums[2] * peak_bytes)

    def _gauge(self, name: str, doc: str):
        return Gauge(name, doc, LABELS, registry=self.registry).labels(**self.labels)

    def _counter(self, name: str, doc: str):
        return Counter(name, doc, LABELS, registry=self.registry).labels(**self.labels)

    def _child(self, metric):
        return metric.labels(**self.labels)


def step_shape(engine: Engine, outputs: Sequence[RequestOutput]) -> tuple[int, int, int] | None:
    """(requests, prefill tokens, decode tokens) of the step just run; None when it ran nothing. See the module
    docstring for the two ways."""
    schedule = getattr(engine, "last_schedule", None)
    prefill = decode = 0
    if schedule is not None:
        for chunk in schedule.chunks:
            n = len(chunk.token_ids)
            if n == 1 and chunk.output_index:
                decode += 1
            else:
                prefill += n
        return (len(schedule.chunks), prefill, decode) if schedule.chunks else None
    if not outputs:
        return None
    for output in outputs:
        if len(output.token_ids) == 1:
            prefill += len(output.prompt_token_ids)
        else:
            decode += 1
    return len(outputs), prefill, decode


def _reader(load: Callable[[], EngineLoad | None], field: str) -> Callable[[], float]:
    def read() -> float:
        value = load()
        return 0.0 if value is None else getattr(value, field)
    return read
