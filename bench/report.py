"""A benchmark's report: the JSON document `pdserve bench` writes (report.json) and the text it prints.

report.json holds the run configuration, and per run (one, or one per rate of a sweep): the trace's figures, the
`Summary`, the pool-size samples and, with records, every request; for a sweep also the (rate, attainment) points
and the goodput. Non-finite numbers (nan, inf) become null so the file is strict JSON.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict

from pdserve.bench.load_generator import PoolSample, RunResult
from pdserve.bench.metrics import GoodputEstimate, Summary
from pdserve.bench.workloads import TraceEntry, trace_stats


def run_report(rate: float | None, trace: Sequence[TraceEntry], result: RunResult, summary: Summary,
               with_records: bool = False) -> dict:
    """One run's part of the report (the trace figures are of the entries sent)."""
    sent = list(trace)[:len(trace) - result.not_sent]  # both loops send in trace order
    part = {"rate": rate, "trace": trace_stats(sent), "not_sent": result.not_sent, "summary": summary.to_dict(),
            "pool_samples": [asdict(s) for s in result.pool_samples]}
    if with_records:
        part["records"] = [r.to_dict() for r in result.records]
    return part


def build_report(config: dict, runs: Sequence[dict], goodput: GoodputEstimate | None = None) -> dict:
    report = {"config": config, "runs": list(runs)}
    if goodput is not None:
        report["sweep"] = goodput.to_dict()
    return report


def write_report(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(strict_json(report), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def strict_json(value):
    """`value` with every non-finite float replaced by None (and tuples by lists)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def format_summary(summary: Summary, pool_samples: Sequence[PoolSample] = (), title: str = "") -> str:
    """A few lines for a terminal: counts, throughput, attainment and p50/p90/p95/p99 of each latency."""
    lines = [title] if title else []
    errors = ", ".join(f"{k} {v}" for k, v in sorted(summary.errors.items()))
    lines.append(f"requests {summary.requests}  ok {summary.ok}  failed {summary.failed}"
                 + (f" ({errors})" if errors else "") + f"  in {summary.duration_s:.1f} s")
    lines.append(f"throughput {summary.request_throughput:.2f} req/s, {summary.output_throughput:.1f} output tok/s")
    lines.append(f"SLO attainment {_pct(summary.attainment)} (TTFT <= {summary.slo.ttft_s:g} s and "
                 f"TPOT <= {summary.slo.tpot_s:g} s)")
    header = f"{'':<18}" + "".join(f"{q:>10}" for q in summary.ttft_s)
    lines.append(header)
    for name, values, unit in (("TTFT", summary.ttft_s, "ms"), ("TPOT", summary.tpot_s, "ms"),
                               ("ITL", summary.itl_s, "ms"), ("e2e", summary.e2e_s, "s"),
                               ("router queue", summary.queue_s, "ms"), ("input tok", summary.input_tokens, ""),
                               ("output tok", summary.output_tokens, "")):
        scale = 1000.0 if unit == "ms" else 1.0
        label = f"{name} ({unit})" if unit else name
        lines.append(f"{label:<18}" + "".join(f"{_num(v * scale):>10}" for v in values.values()))
    if pool_samples:
        first, last = pool_samples[0], pool_samples[-1]
        lines.append(f"pools (ready prefill/decode/colocated): start {first.n_prefill}/{first.n_decode}/"
                     f"{first.n_both}, end {last.n_prefill}/{last.n_decode}/{last.n_both}, "
                     f"{len(pool_samples)} samples")
    return "\n".join(lines)


def format_sweep(estimate: GoodputEstimate) -> str:
    lines = [f"{'rate (req/s)':>12}  {'attainment':>10}"]
    lines += [f"{r:>12.3g}  {_pct(a):>10}" for r, a in estimate.points]
    if estimate.rate > 0 and any(r > estimate.rate for r, _ in estimate.points):
        lines.append(f"goodput {estimate.rate:.3g} req/s at >= {estimate.target:.0%} attainment "
                     f"(interpolated {estimate.interpolated:.3g} req/s)")
    elif estimate.rate > 0:
        lines.append(f"goodput {estimate.rate:.3g} req/s at >= {estimate.target:.0%} attainment "
                     "(at least: the highest rate tried; sweep higher)")
    else:
        lines.append(f"goodput: below the lowest rate tried (no rate reached {estimate.target:.0%} attainment)")
    return "\n".join(lines)


def _num(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _pct(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.1%}"
