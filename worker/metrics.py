"""A worker's Prometheus metrics (labels `worker_id`, `role`): its load, its engine steps and its KV handoffs.

Fed on the engine thread: `step(engine, outputs, seconds)` after every step that ran (the engine thread's `on_step`)
and `transfer(result)` for every KV transfer outcome the worker polls. The engine thread only bumps plain Python
numbers (a step costs a couple of µs, where prometheus_client's metrics take a lock per update); `collect` turns them
into metric families when /metrics is scraped, and reads the load gauges from the engine thread's latest
`EngineLoad` then. A scrape may see a step half-recorded (a histogram's sum one observation ahead of its buckets);
the next scrape is whole again.

    pdserve_worker_requests_running / _waiting / _held   gauge      the engine's queues (held: prefilled and waiting
                                                                    for the handoff, or reserved for KV arriving)
    pdserve_worker_queued_prefill_tokens                  gauge      prompt tokens still to compute
    pdserve_worker_kv_blocks_used / _total                gauge      KV cache blocks
    pdserve_worker_step_seconds                           histogram  engine step duration
    pdserve_worker_step_requests                          histogram  requests per step (the batch size)
    pdserve_worker_prefill_tokens_total                   counter    prompt tokens computed
    pdserve_worker_decode_tokens_total                    counter    tokens decoded (one per decode step per request)
    pdserve_worker_preemptions_total                      counter    requests preempted (recomputed later)
    pdserve_worker_requests_reaped_total                  counter    requests aborted because their router stopped
                                                                    collecting their tokens (its lease lapsed)
    pdserve_worker_kv_transfers_total{status}             counter    KV transfers ended: done, failed, cancelled
                                                                    (an aborted request's KV, discarded),
                                                                    timed_out
    pdserve_worker_kv_transfer_seconds                    histogram  a handoff that moved KV, start to done (sends on
                                                                    a prefill worker, receives on a decode worker)
    pdserve_worker_kv_transfer_bytes_total                counter    bytes those handoffs moved
    pdserve_worker_kv_bytes_not_sent_total                counter    KV bytes a prefill worker did not send because
                                                                    the decode worker held them (prefix cache)
    pdserve_worker_prefix_cache_queried_tokens_total      counter    prompt tokens of requests started here
    pdserve_worker_prefix_cache_hit_tokens_total          counter    of those, tokens whose KV came from the prefix
                                                                    cache (hit rate: hit / queried)
    pdserve_worker_prefix_cache_evictions_total           counter    cached blocks evicted for other KV
    pdserve_worker_speculative_steps_total                counter    speculative steps (label `method`: prompt_lookup
                                                                    or draft), each checking a request's proposals
    pdserve_worker_speculative_proposed_tokens_total      counter    tokens proposed by speculative decoding
                                                                    (lookahead: N - 1 a step with a candidate)
    pdserve_worker_speculative_accepted_tokens_total      counter    of those, tokens the model accepted (acceptance
                                                                    rate: accepted / proposed; mean accepted length,
                                                                    the model's own token counted: 1 + accepted /
                                                                    steps)
    pdserve_worker_mfu / pdserve_worker_mbu               gauge      model FLOPs / bandwidth utilization per GPU

Step shape: when the engine keeps the step's `SchedulerOutput` as `engine.last_schedule`, requests and tokens are
exact (a chunk of one token for a request that has output, or a speculative chunk, is a decode; every other chunk is
prefill). Without it they
are read off the step's outputs: a step counts when it sampled a token, its batch size is the requests that sampled,
and a prompt's tokens count as prefilled in the step that finishes its prefill (a chunked prompt's earlier chunks,
which sample nothing, are not seen apart).

MFU and MBU need the hardware's peak, which only a simulated engine knows (`engine.cost_model.hardware`): over the
last `window` steps that ran, MFU = sum(flops) / (sum(seconds) * peak_flops) and MBU = sum(bytes) / (sum(seconds) *
hbm_bytes_per_s), from the sim runner's `last_cost` (FLOPs and bytes of one GPU, so no tensor-parallel factor: every
rank does the same share), i.e. utilization while busy. A torch engine (CPU or GPU) has no known peak: the two
gauges stay unset (described, no samples).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from pdserve.engine.engine import Engine
from pdserve.engine.engine_load import EngineLoad
from pdserve.engine.request import RequestOutput
from pdserve.kv_transfer.connector import TransferResult, TransferStatus
from pdserve.worker.metrics_server import BATCH_BUCKETS, LATENCY_BUCKETS

LABELS = ("worker_id", "role")
MFU_WINDOW_STEPS = 32

LOAD_GAUGES = (
    ("requests_running", "running", "Requests running (prefilling or decoding)."),
    ("requests_waiting", "waiting", "Requests waiting for their first step."),
    ("requests_held", "held", "Requests holding KV blocks outside the running set (handoff)."),
    ("queued_prefill_tokens", "queued_prefill_tokens", "Prompt tokens still to compute."),
    ("kv_blocks_used", "kv_blocks_used", "KV cache blocks in use."),
    ("kv_blocks_total", "kv_blocks_total", "KV cache blocks in all."),
)
"""(metric name after pdserve_worker_, EngineLoad field, help)."""


class Buckets:
    """A histogram one thread fills without a lock: counts per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket `le` holds values <= le
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        counts, total, out = list(self.counts), 0, []
        for bound, count in zip((*self.bounds, float("inf")), counts):
            total += count
            out.append((floatToGoString(bound), total))
        return out


class WorkerMetrics:
    def __init__(self, worker_id: str, role: str, load: Callable[[], EngineLoad | None],
                 window: int = MFU_WINDOW_STEPS, pairs: Callable[[], dict[str, int]] = dict) -> None:
        """`load`: the engine's latest load (None before it is built); `pairs`: this worker's KV pairs now, counted
        by how each moves KV ("ipc", "gloo", ...). Both read at every scrape."""
        self.label_values = (worker_id, role)
        self._load = load
        self._pairs = pairs
        self.step_seconds = Buckets(LATENCY_BUCKETS)
        self.step_requests = Buckets(BATCH_BUCKETS)
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.preemptions = 0
        self.reaped = 0
        """Requests aborted because their router's lease lapsed (bumped on the worker's event loop)."""
        self.transfers = dict.fromkeys(TransferStatus, 0)
        self.transfer_seconds = Buckets(LATENCY_BUCKETS)
        self.transfer_bytes = 0
        self.kv_bytes_not_sent = 0
        """KV bytes not sent because the decode worker held them (bumped by the prefill worker)."""
        self.cache_queried_tokens = 0
        self.cache_hit_tokens = 0
        self.cache_evictions = 0
        self.speculative_method = "none"
        self.speculative_steps = 0
        self.speculative_proposed = 0
        self.speculative_accepted = 0
        self.mfu: float | None = None
        """None: unknown (a torch engine, or no step yet)."""
        self.mbu: float | None = None
        self._bound = False
        self._peak: tuple[float, float] | None = None
        """(peak FLOP/s, HBM bytes/s) of one GPU; None: unknown (a torch engine)."""
        self._preemptions_seen = 0
        self._last_cost: object = None
        self._window: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._sums = [0.0, 0.0, 0.0]
        """flops, bytes, seconds over the window."""
        self.registry = CollectorRegistry()
        self.registry.register(self)

    # ---- on the engine thread --------------------------------------------------------------------------------
    def step(self, engine: Engine, outputs: Sequence[RequestOutput], seconds: float) -> None:
        """After a step that ran: `seconds` is how long `engine.step()` took."""
        if not self._bound:
            self._bind(engine)
        self.cache_queried_tokens = engine.prompt_tokens_total
        self.cache_hit_tokens = engine.cached_tokens_total
        self.cache_evictions = engine.blocks.evictions
        self.speculative_method = engine.config.speculative.method
        self.speculative_steps = engine.speculative_steps_total
        self.speculative_proposed = engine.speculative_proposed_total
        self.speculative_accepted = engine.speculative_accepted_total
        if engine.preemptions_total != self._preemptions_seen:
            self.preemptions += engine.preemptions_total - self._preemptions_seen
            self._preemptions_seen = engine.preemptions_total
        shape = step_shape(engine, outputs)
        if shape is None:
            return  # nothing was scheduled
        requests, prefill_tokens, decode_tokens = shape
        self.step_seconds.observe(seconds)
        self.step_requests.observe(requests)
        self.prefill_tokens += prefill_tokens
        self.decode_tokens += decode_tokens
        if self._peak is not None:
            self._utilization(engine.runner.last_cost)

    def transfer(self, result: TransferResult) -> None:
        """A KV transfer's outcome (from `connector.poll()`)."""
        self.transfers[result.status] += 1
        if result.status is TransferStatus.DONE and result.bytes:  # an empty transfer moves nothing
            self.transfer_seconds.observe(result.seconds)
            self.transfer_bytes += result.bytes

    # ---- on the scraping thread ------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        """The metric families now (prometheus_client's Collector protocol)."""
        labels = self.label_values
        load = self._load()
        for name, field, doc in LOAD_GAUGES:
            yield _gauge(f"pdserve_worker_{name}", doc, labels, 0.0 if load is None else getattr(load, field))
        yield _histogram("pdserve_worker_step_seconds", "Engine step duration.", labels, self.step_seconds)
        yield _histogram("pdserve_worker_step_requests", "Requests per engine step.", labels, self.step_requests)
        yield _counter("pdserve_worker_prefill_tokens", "Prompt tokens computed.", labels, self.prefill_tokens)
        yield _counter("pdserve_worker_decode_tokens", "Tokens decoded.", labels, self.decode_tokens)
        yield _counter("pdserve_worker_preemptions", "Requests preempted (recomputed later).", labels,
                       self.preemptions)
        yield _counter("pdserve_worker_requests_reaped", "Requests aborted because their router stopped collecting "
                       "their tokens (its lease lapsed).", labels, self.reaped)
        transfers = CounterMetricFamily("pdserve_worker_kv_transfers", "KV transfers ended, by status.",
                                        labels=(*LABELS, "status"))
        for status, count in list(self.transfers.items()):
            transfers.add_metric((*labels, status.value), count)
        yield transfers
        pairs = GaugeMetricFamily("pdserve_worker_kv_pairs", "KV pairs this worker has now, by how each moves KV "
                                  "(ipc: a copy on one node; gloo, nccl, nixl: over the network).",
                                  labels=(*LABELS, "transport"))
        for transport, count in self._pairs().items():
            pairs.add_metric((*labels, transport), count)
        yield pairs
        yield _histogram("pdserve_worker_kv_transfer_seconds", "A KV handoff that moved KV, start to done.", labels,
                         self.transfer_seconds)
        yield _counter("pdserve_worker_kv_transfer_bytes", "Bytes of KV handoffs.", labels, self.transfer_bytes)
        yield _counter("pdserve_worker_kv_bytes_not_sent", "KV bytes not sent: the decode worker held them.", labels,
                       self.kv_bytes_not_sent)
        yield _counter("pdserve_worker_prefix_cache_queried_tokens", "Prompt tokens of requests started here.",
                       labels, self.cache_queried_tokens)
        yield _counter("pdserve_worker_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache.",
                       labels, self.cache_hit_tokens)
        yield _counter("pdserve_worker_prefix_cache_evictions", "Cached KV blocks evicted for other KV.", labels,
                       self.cache_evictions)
        method = self.speculative_method
        yield _method_counter("pdserve_worker_speculative_steps", "Speculative steps, each checking a request's "
                              "proposals.", labels, method, self.speculative_steps)
        yield _method_counter("pdserve_worker_speculative_proposed_tokens", "Tokens proposed by speculative decoding.",
                              labels, method, self.speculative_proposed)
        yield _method_counter("pdserve_worker_speculative_accepted_tokens", "Proposed tokens the model accepted.",
                              labels, method, self.speculative_accepted)
        yield _gauge("pdserve_worker_mfu", "Model FLOPs utilization per GPU over recent steps (sim engines only).",
                     labels, self.mfu)
        yield _gauge("pdserve_worker_mbu", "Model bandwidth utilization per GPU over recent steps (sim engines only).",
                     labels, self.mbu)

    # ---- internals -------------------------------------------------------------------------------------------
    def _bind(self, engine: Engine) -> None:
        """First step: learn whether the engine knows its hardware's peak (only a simulated one does)."""
        self._bound = True
        self._preemptions_seen = engine.preemptions_total
        if engine.config.simulated:
            hardware = engine.cost_model.hardware
            self._peak = (hardware.peak_flops, hardware.hbm_bytes_per_s)

    def _utilization(self, cost) -> None:
        """Slide the window by the step's modelled cost (FLOPs and bytes of one GPU, seconds)."""
        if cost is None or cost is self._last_cost:
            return  # the runner did not run in this step
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
        if sums[2] > 0:
            peak_flops, peak_bytes = self._peak
            self.mfu = sums[0] / (sums[2] * peak_flops)
            self.mbu = sums[1] / (sums[2] * peak_bytes)


def step_shape(engine: Engine, outputs: Sequence[RequestOutput]) -> tuple[int, int, int] | None:
    """(requests, prefill tokens, decode tokens) of the step just run; None when it ran nothing. See the module
    docstring for the two ways."""
    schedule = getattr(engine, "last_schedule", None)
    prefill = decode = 0
    if schedule is not None:
        for chunk in schedule.chunks:
            n = len(chunk.token_ids)
            if (n == 1 or chunk.speculates) and chunk.output_index:
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


def _gauge(name: str, doc: str, labels: tuple[str, ...], value: float | None) -> GaugeMetricFamily:
    """A gauge family; no sample when `value` is None (unknown)."""
    family = GaugeMetricFamily(name, doc, labels=LABELS)
    if value is not None:
        family.add_metric(labels, value)
    return family


def _counter(name: str, doc: str, labels: tuple[str, ...], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=LABELS)
    family.add_metric(labels, value)
    return family


def _method_counter(name: str, doc: str, labels: tuple[str, ...], method: str, value: float) -> CounterMetricFamily:
    """A counter with the speculative decoding method as a label too."""
    family = CounterMetricFamily(name, doc, labels=(*LABELS, "method"))
    family.add_metric((*labels, method), value)
    return family


def _histogram(name: str, doc: str, labels: tuple[str, ...], buckets: Buckets) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=LABELS)
    family.add_metric(labels, buckets.cumulative(), buckets.sum)
    return family
