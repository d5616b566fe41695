"""The load generator: sends a trace to a running router (gRPC, or the OpenAI HTTP API: `bench.transports`) and
times every token at the client.

A run's life: connect (fail fast if the router does not answer) -> start the clock -> send requests (open loop: each
at its trace arrival time, never waiting for earlier ones; closed loop: `concurrency` in flight, the next one sent as
soon as one finishes, trace arrival times ignored) -> stream each response, noting the client time of every message ->
one `RequestRecord` per request sent.

Prompts are random token ids in [1000, vocab_size), seeded per request (seed, index), so runs are repeatable and no
two prompts in a run share a prefix (give each run of a sweep its own seed, or a prefix cache will remember them);
max_tokens is the entry's output length with ignore_eos, greedy.

Bounds: `timeout_s` per request (the gRPC deadline: DEADLINE_EXCEEDED), `max_requests`, and an overall `deadline_s`
after which requests in flight are cancelled and recorded as failed ("timeout: ...") and entries not yet sent are
dropped (counted in `RunResult.not_sent`, not in the records).

While it runs, a `PoolSampler` can read the worker registry in Redis every second and note how many prefill, decode
and colocated workers are ready, so a report can show the pool sizes against the load.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.bench.metrics import RequestRecord, record_from_stream
from pdserve.bench.transports import API_CHOICES, GrpcTransport, OpenAITransport, TransportError, transport_for
from pdserve.bench.workloads import FIRST_TOKEN_ID, TraceEntry, make_prompt_ids

log = logging.getLogger(__name__)

OVERALL_TIMEOUT = "timeout: cancelled at the overall deadline"


class RouterUnavailable(RuntimeError):
    """The router did not answer at the start of a run."""


@dataclass(frozen=True)
class LoadConfig:
    router: str
    """host:port of the router (its gRPC port, or with api "openai" its HTTP port or base URL)."""
    api: str = "grpc"
    """How requests are sent: "grpc" or "openai" (/v1/completions with SSE; `bench.transports`)."""
    concurrency: int | None = None
    """Closed loop with this many requests in flight; None: open loop at the trace's arrival times."""
    timeout_s: float = 120.0
    """Per request (gRPC deadline)."""
    deadline_s: float | None = None
    """For the whole run, from its start; None: no overall deadline."""
    send_until_s: float | None = None
    """Closed loop: send no new request after this many seconds from the start (in-flight ones finish)."""
    max_requests: int | None = None
    vocab_size: int = 32000
    seed: int = 0
    progress: bool = True
    """A tqdm bar on stderr (shown only when stderr is a terminal)."""
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency: must be >= 1, got {self.concurrency!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s!r}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"deadline_s: must be > 0, got {self.deadline_s!r}")
        if self.send_until_s is not None and not self.send_until_s > 0:
            raise ValueError(f"send_until_s: must be > 0, got {self.send_until_s!r}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests: must be >= 1, got {self.max_requests!r}")
        if self.api not in API_CHOICES:
            raise ValueError(f"api: one of {', '.join(API_CHOICES)}, got {self.api!r}")
        if self.vocab_size <= FIRST_TOKEN_ID:
            raise ValueError(f"vocab_size: must be > {FIRST_TOKEN_ID}, got {self.vocab_size!r}")


@dataclass(frozen=True)
class PoolSample:
    t_s: float
    """Seconds from the start of the run."""
    n_prefill: int
    n_decode: int
    n_both: int
    n_not_ready: int
    """Workers starting or draining (any role)."""


@dataclass(frozen=True)
class RunResult:
    records: tuple[RequestRecord, ...]
    """One per request sent, in the order they finished."""
    pool_samples: tuple[PoolSample, ...]
    duration_s: float
    """From the start of the run to the last request's end."""
    not_sent: int
    """Trace entries dropped at the overall deadline or by max_requests."""


def count_pools(workers: Sequence) -> tuple[int, int, int, int]:
    """(ready prefill, ready decode, ready colocated, not ready) from `WorkerInfo`s."""
    counts = {"prefill": 0, "decode": 0, "both": 0}
    not_ready = 0
    for w in workers:
        if w.state.value != "ready":
            not_ready += 1
        else:
            counts[w.role.value] += 1
    return counts["prefill"], counts["decode"], counts["both"], not_ready


def registry_source(redis_url: str, cluster: str = "default") -> Callable[[], list]:
    """What `PoolSampler` reads: the cluster's registered workers (`Registry.workers`)."""
    from pdserve.registry.registry import Registry

    return Registry(redis_url, cluster).workers


class PoolSampler:
    """Every `interval_s`, counts the workers `source()` returns; a failed read is logged and skipped."""

    def __init__(self, source: Callable[[], Sequence], interval_s: float = 1.0) -> None:
        self.source = source
        self.interval_s = interval_s
        self.samples: list[PoolSample] = []

    async def run(self, start: float) -> None:
        import redis

        while True:
            try:
                workers = await asyncio.to_thread(self.source)
                self.samples.append(PoolSample(time.monotonic() - start, *count_pools(workers)))
            except (redis.RedisError, OSError, ValueError, KeyError, TypeError) as e:
                log.warning("pool sampler: cannot read the worker registry: %s", e)
            await asyncio.sleep(self.interval_s)


class LoadGenerator:
    def __init__(self, config: LoadConfig) -> None:
        self.config = config

    def run(self, trace: Sequence[TraceEntry], pool_sampler: PoolSampler | None = None) -> RunResult:
        return asyncio.run(self.run_async(trace, pool_sampler))

    async def run_async(self, trace: Sequence[TraceEntry], pool_sampler: PoolSampler | None = None) -> RunResult:
        cfg = self.config
        trace = list(trace)
        limit = len(trace) if cfg.max_requests is None else min(len(trace), cfg.max_requests)
        transport = transport_for(cfg.api, cfg.router)
        try:
            try:
                await asyncio.wait_for(transport.ready(), cfg.connect_timeout_s)
            except (TimeoutError, OSError, TransportError) as e:
                raise RouterUnavailable(f"the router at {cfg.router} does not answer "
                                        f"(waited {cfg.connect_timeout_s:g} s)") from e
            run = _Run(cfg, transport, trace[:limit])
            sampler = asyncio.create_task(pool_sampler.run(run.start)) if pool_sampler else None
            try:
                await run.go()
            finally:
                if sampler is not None:
                    sampler.cancel()
                    await asyncio.gather(sampler, return_exceptions=True)
                run.close()
        finally:
            await transport.close()
        samples = tuple(pool_sampler.samples) if pool_sampler else ()
        return RunResult(tuple(run.records), samples, run.end - run.start, run.not_sent + len(trace) - limit)


class _Run:
    """One run's state: the clock, the records so far, the progress bar."""

    def __init__(self, config: LoadConfig, transport: GrpcTransport | OpenAITransport,
                 trace: list[TraceEntry]) -> None:
        from tqdm import tqdm

        self.config = config
        self.transport = transport
        self.trace = trace
        self.records: list[RequestRecord] = []
        self.not_sent = 0
        self.request_prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.start = time.monotonic()
        self.end = self.start
        self.bar = tqdm(total=len(trace), file=sys.stderr, unit="req", dynamic_ncols=True,
                        disable=not config.progress or not sys.stderr.isatty())

    def close(self) -> None:
        self.bar.close()

    async def go(self) -> None:
        sent: list[asyncio.Task] = []
        loop = self.open_loop(sent) if self.config.concurrency is None else self.closed_loop(sent)
        try:
            await asyncio.wait_for(loop, self.config.deadline_s)
        except TimeoutError:
            log.warning("overall deadline (%s s) reached: cancelling what is still in flight",
                        self.config.deadline_s)
            for task in sent:
                task.cancel()
            await asyncio.gather(*sent, return_exceptions=True)
            self.not_sent = len(self.trace) - len(sent)
        self.end = time.monotonic()

    async def open_loop(self, sent: list[asyncio.Task]) -> None:
        for index, entry in enumerate(self.trace):
            delay = self.start + entry.arrival_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent.append(asyncio.create_task(self.one(index, entry)))
        await asyncio.gather(*sent)

    async def closed_loop(self, sent: list[asyncio.Task]) -> None:
        queue = iter(enumerate(self.trace))
        until = self.config.send_until_s

        async def worker() -> None:
            for index, entry in queue:
                if until is not None and time.monotonic() - self.start >= until:
                    break
                task = asyncio.create_task(self.one(index, entry))
                sent.append(task)
                await task

        await asyncio.gather(*(worker() for _ in range(self.config.concurrency)))
        self.not_sent = len(self.trace) - len(sent)

    async def one(self, index: int, entry: TraceEntry) -> None:
        cfg = self.config
        request_id = f"{self.request_prefix}-{index}"
        prompt = make_prompt_ids(cfg.seed, index, entry, cfg.vocab_size)
        token_times: list[tuple[float, int]] = []
        queue_s, ok, error = math.nan, True, ""
        sent = time.monotonic()
        try:
            async for tokens, queue in self.transport.stream(request_id, prompt, entry.output_tokens, cfg.timeout_s):
                if tokens:
                    token_times.append((time.monotonic(), tokens))
                if queue is not None:
                    queue_s = queue
        except TransportError as e:
            ok, error = False, str(e)
        except asyncio.CancelledError:  # the overall deadline: leaving the stream cancelled the request
            self.finish(record_from_stream(request_id, sent - self.start, entry.input_tokens, sent, token_times,
                                           time.monotonic(), queue_s, False, OVERALL_TIMEOUT))
            raise
        self.finish(record_from_stream(request_id, sent - self.start, entry.input_tokens, sent, token_times,
                                       time.monotonic(), queue_s, ok, error))

    def finish(self, record: RequestRecord) -> None:
        self.records.append(record)
        self.bar.update(1)
        if not record.ok:
            failed = sum(not r.ok for r in self.records)
            self.bar.set_postfix(failed=failed, refresh=False)
