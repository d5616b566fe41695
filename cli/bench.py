"""`pdserve bench`: load-test a running cluster and report client-side latency, SLO attainment and goodput.

    pdserve bench --workload chat --rate 2 --duration-s 60 --slo-ttft 2 --slo-tpot 0.2 --out results/
    pdserve bench --workload shift --rate 1 --arrival gamma --cv 3 --duration-s 300 --out results/
    pdserve bench --trace trace.jsonl [--rate R]                   # a recorded trace (rescaled to R req/s if given)
    pdserve bench --workload code --concurrency 8 --num-requests 200     # closed loop: 8 requests in flight
    pdserve bench --workload chat --sweep 0.5,1,2,4 --num-requests 100   # goodput: attainment at each rate
    pdserve bench --workload multiturn --conversations 8 --turns 6       # multi-turn chats (prefix caching)

Open loop (default): every request is sent at its arrival time whatever happened to the earlier ones. Closed loop
(--concurrency N): N in flight, arrival times ignored, no new request after --duration-s. A sweep runs the same trace
shape at each rate (same seed: the same lengths; with --num-requests the same arrival pattern, only closer together;
with a --trace, the file rescaled to each mean rate; fresh prompt token ids each run) and reports the goodput: the
highest rate at which >= 90% of all requests (failed ones count as misses) meet both the TTFT and the TPOT SLO.

The router and Redis default to the cluster `pdserve up` started (its state file). With Redis known, the ready
prefill/decode worker counts are sampled every second and shown against the load. --out DIR writes report.json,
PNG plots and (single run) trace.jsonl. Exit code 2: bad arguments, bad trace, no cluster or no router; 1: every
request failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass

from pdserve.bench.workloads import ARRIVALS, NAMED, TraceEntry, TraceError, cap_lengths
from pdserve.cli.bench_multiturn import add_arguments as add_multiturn_arguments
from pdserve.cli.bench_multiturn import run_multiturn_bench

log = logging.getLogger(__name__)

CLOSED_LOOP_REQUESTS = 100_000
"""Trace length for a closed loop bounded only by time (entries are cheap; unsent ones are not recorded)."""
DEADLINE_GRACE_S = 5.0


class BenchError(ValueError):
    """A bad argument; the message names it."""


@dataclass(frozen=True)
class Run:
    rate: float | None
    """The trace's request rate (None: closed loop or a trace file as recorded)."""
    trace: tuple[TraceEntry, ...]
    seed: int
    """Seeds the prompts' token ids."""
    send_until_s: float | None
    deadline_s: float


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bench", help="load-test a running cluster (latency, SLO attainment, goodput)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--workload", choices=(*NAMED, "multiturn"),
                        help="a built-in workload (default chat); multiturn: conversations resending their history "
                             "(see below)")
    source.add_argument("--trace", metavar="FILE.jsonl", help='{"arrival_s", "input_tokens", "output_tokens"} lines')
    p.add_argument("--router", metavar="HOST:PORT", help="the router (default: the cluster `pdserve up` started); "
                   "with --api openai its HTTP address or base URL")
    p.add_argument("--api", choices=("grpc", "openai"), default="grpc",
                   help="send requests over gRPC (default) or the OpenAI-compatible HTTP API (/v1/completions, SSE)")
    p.add_argument("--redis-url", help="where to sample pool sizes (default: the running cluster's Redis)")
    p.add_argument("--rate", type=float, help="requests/s (default 1; with --trace: rescale the file to this rate)")
    p.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    p.add_argument("--cv", type=float, default=1.0, help="with --arrival gamma: inter-arrival cv (> 1 is bursty)")
    p.add_argument("--duration-s", type=float, help="trace length, or closed loop: send for this long (default 60 "
                                                    "unless --num-requests)")
    p.add_argument("--num-requests", type=int, help="trace length in requests")
    p.add_argument("--max-requests", type=int, help="send at most this many requests per run")
    p.add_argument("--concurrency", type=int, help="closed loop with N requests in flight")
    p.add_argument("--sweep", metavar="R1,R2,...", help="run at each rate and report the goodput")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO in seconds (default 2, CPU scale)")
    p.add_argument("--slo-tpot", type=float, default=0.2, help="TPOT SLO in seconds (default 0.2, CPU scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-input-tokens", type=int, help="clip prompt lengths to this")
    p.add_argument("--max-output-tokens", type=int, help="clip output lengths to this")
    p.add_argument("--vocab-size", type=int, default=32000, help="prompt token ids are drawn from [1000, this)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per request (default 120)")
    p.add_argument("--deadline-s", type=float, help="per run, overall (default: the trace + --timeout-s)")
    p.add_argument("--out", metavar="DIR", help="write report.json and PNG plots here")
    p.add_argument("--records", action="store_true", help="put every request in report.json")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_multiturn_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pdserve.bench.load_generator import RouterUnavailable
    from pdserve.bench.metrics import SLO
    from pdserve.cli.cluster_state import NoCluster

    try:
        if args.workload == "multiturn":
            return run_multiturn_bench(args, _address(args))
        slo = SLO(args.slo_ttft, args.slo_tpot)
        runs = plan_runs(args)
        address = _address(args)
        return _bench(args, address, slo, runs)
    except (BenchError, TraceError, NoCluster, RouterUnavailable, OSError, ValueError) as e:
        print(f"pdserve bench: {e}", file=sys.stderr)
        return 2


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise BenchError(f"--sweep: must be rates separated by commas, got {text!r}") from e
    if not rates or any(not (math.isfinite(r) and r > 0) for r in rates):
        raise BenchError(f"--sweep: every rate must be a number > 0, got {text!r}")
    return rates


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """The runs the arguments ask for, each with its trace (reads --trace; raises BenchError or TraceError)."""
    from pdserve.bench.workloads import mean_rate, named_trace, read_trace, scale_rate

    _check(args)
    closed = args.concurrency is not None
    rates = parse_rates(args.sweep) if args.sweep else [args.rate]
    duration = args.duration_s if args.duration_s is not None or args.num_requests else 60.0
    recorded_trace = read_trace(args.trace) if args.trace else []
    runs = []
    for i, rate in enumerate(rates):
        if args.trace:
            trace = recorded_trace
            if rate is not None:
                recorded = mean_rate(trace)
                if not (math.isfinite(recorded) and recorded > 0):
                    raise BenchError(f"--rate/--sweep: {args.trace} has no span to rescale (all at one time?)")
                trace = scale_rate(trace, rate / recorded)
        elif closed:
            trace = named_trace(args.workload or "chat", 1.0, num_requests=args.num_requests or CLOSED_LOOP_REQUESTS,
                                seed=args.seed, max_input_tokens=args.max_input_tokens,
                                max_output_tokens=args.max_output_tokens)
        else:
            rate = 1.0 if rate is None else rate
            trace = named_trace(args.workload or "chat", rate, duration, args.num_requests, args.arrival, args.cv,
                                args.seed, args.max_input_tokens, args.max_output_tokens)
        if args.max_requests is not None:
            trace = trace[:args.max_requests]
        if not trace:
            raise BenchError("the trace is empty (raise --duration-s or --rate)")
        if args.trace and (args.max_input_tokens or args.max_output_tokens):
            trace = [cap_lengths(e, args.max_input_tokens, args.max_output_tokens) for e in trace]
        send_until = duration if closed else None
        span = send_until if closed and send_until is not None else trace[-1].arrival_s
        deadline = args.deadline_s or span + args.timeout_s + DEADLINE_GRACE_S
        if closed and send_until is None:  # bounded by --num-requests: let them all run one after another
            deadline = args.deadline_s or math.inf
        run_rate = None if closed else rate if rate is not None else mean_rate(trace)
        runs.append(Run(run_rate, tuple(trace), args.seed + i, send_until, deadline))
    return runs


def _check(args: argparse.Namespace) -> None:
    for name in ("rate", "cv", "duration_s", "timeout_s", "deadline_s", "slo_ttft", "slo_tpot"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise BenchError(f"--{name.replace('_', '-')}: must be a number > 0, got {value!r}")
    for name in ("num_requests", "max_requests", "concurrency", "max_input_tokens", "max_output_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name.replace('_', '-')}: must be >= 1, got {value!r}")
    if args.vocab_size <= 1000:
        raise BenchError(f"--vocab-size: must be > 1000, got {args.vocab_size!r}")
    if args.concurrency is not None and args.sweep:
        raise BenchError("--sweep sweeps the request rate: it does not go with --concurrency")
    if args.concurrency is not None and args.rate is not None:
        raise BenchError("--rate does not go with --concurrency (a closed loop sends as fast as requests finish)")
    if args.sweep and args.rate is not None:
        raise BenchError("give --rate or --sweep, not both")


def _bench(args: argparse.Namespace, address: str, slo, runs: list[Run]) -> int:
    from pdserve.bench.load_generator import LoadConfig, LoadGenerator, PoolSampler, registry_source
    from pdserve.bench.metrics import goodput_estimate, summarize
    from pdserve.bench.report import build_report, format_summary, format_sweep, run_report, strict_json

    redis_url = _redis_url(args)
    source = registry_source(redis_url) if redis_url else None
    parts, points, results = [], [], []
    for number, plan in enumerate(runs, start=1):
        config = LoadConfig(router=address, api=args.api, concurrency=args.concurrency, timeout_s=args.timeout_s,
                            deadline_s=None if math.isinf(plan.deadline_s) else plan.deadline_s,
                            send_until_s=plan.send_until_s, vocab_size=args.vocab_size, seed=plan.seed,
                            progress=not args.quiet)
        if len(runs) > 1 and not args.quiet:
            print(f"run {number}/{len(runs)}: {plan.rate:g} req/s, {len(plan.trace)} requests", file=sys.stderr)
        result = LoadGenerator(config).run(plan.trace, PoolSampler(source) if source else None)
        summary = summarize(result.records, slo, result.duration_s)
        parts.append(run_report(plan.rate, plan.trace, result, summary, args.records))
        points.append((plan.rate, summary.attainment if math.isfinite(summary.attainment) else 0.0))
        results.append((plan, result, summary))
    estimate = goodput_estimate(points) if args.sweep else None
    report = build_report(_config(args, address, redis_url, slo), parts, estimate)
    if args.out:
        _write_outputs(args, report, results, slo, estimate)
    if args.json:
        print(json.dumps(strict_json(report)))
    else:
        for plan, result, summary in results:
            title = "closed loop" if plan.rate is None else f"rate {plan.rate:g} req/s"
            print(format_summary(summary, result.pool_samples, f"== {title}"))
            if result.not_sent:
                print(f"not sent (deadline or limit): {result.not_sent}")
        if estimate is not None:
            print(format_sweep(estimate))
        if args.out:
            print(f"report: {args.out}/report.json")
    return 1 if all(summary.ok == 0 for _, _, summary in results) else 0


def _write_outputs(args: argparse.Namespace, report: dict, results: list, slo, estimate) -> None:
    import os

    from pdserve.bench.metrics import attainment_series
    from pdserve.bench.plots import plot_attainment_vs_rate, plot_latency_cdfs, plot_timeline
    from pdserve.bench.report import write_report
    from pdserve.bench.workloads import write_trace

    os.makedirs(args.out, exist_ok=True)
    write_report(os.path.join(args.out, "report.json"), report)
    single = len(results) == 1
    for plan, result, _ in results:
        suffix = "" if single else f"-r{plan.rate:g}"
        name = "closed loop" if plan.rate is None else f"{plan.rate:g} req/s"
        plot_latency_cdfs(result.records, slo, os.path.join(args.out, f"latency{suffix}.png"), f"latency, {name}")
        plot_timeline([r.arrival_s for r in result.records], result.pool_samples,
                      attainment_series(result.records, slo), os.path.join(args.out, f"timeline{suffix}.png"),
                      f"load, pools and SLO attainment (10 s window), {name}")
        if single:
            write_trace(os.path.join(args.out, "trace.jsonl"), plan.trace)
    if estimate is not None:
        plot_attainment_vs_rate(estimate.points, estimate.rate, os.path.join(args.out, "attainment_vs_rate.png"),
                                estimate.target)


def _redis_url(args: argparse.Namespace) -> str | None:
    from pdserve.cli.cluster_state import NoCluster, read_state

    if args.redis_url:
        return args.redis_url
    try:
        state = read_state()
    except (NoCluster, OSError, ValueError, TypeError) as e:
        log.info("no pool sampling: %s", e)
        return None
    if args.router and args.router != state.router_address:
        log.info("no pool sampling: --router %s is not the running cluster's router", args.router)
        return None
    return state.redis_url


def _address(args: argparse.Namespace) -> str:
    """--router, else the running cluster's gRPC address (its HTTP one with --api openai)."""
    from pdserve.cli.cluster_state import read_state

    if args.router:
        return args.router
    state = read_state()
    if args.api == "openai":
        if not state.http_address:
            raise BenchError("--api openai: the cluster serves no HTTP API (router.http_port is off)")
        return state.http_address
    return state.router_address


def _config(args: argparse.Namespace, address: str, redis_url: str | None, slo) -> dict:
    keys = ("workload", "trace", "rate", "arrival", "cv", "duration_s", "num_requests", "max_requests", "concurrency",
            "sweep", "seed", "max_input_tokens", "max_output_tokens", "vocab_size", "timeout_s", "deadline_s")
    config = {k: getattr(args, k) for k in keys}
    if not args.trace:
        config["workload"] = args.workload or "chat"
    config.update(router=address, api=args.api, redis_url=redis_url, slo={"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s})
    return config
