"""Client-side request metrics, SLO attainment and goodput (what a benchmark run's numbers mean).

Latency is measured at the client (DESIGN.md, "Measuring"): TTFT is send -> first token (queueing, prefill and the KV
handoff included); TPOT is (last token time - first token time) / (tokens - 1); ITL is the gap before each token after
the first. Tokens that arrive in one stream message share its arrival time, so a message carrying k tokens adds one
gap and k - 1 zeros: the ITLs then sum to last - first and their mean is the TPOT.

A 1-token request has no TPOT (nan, so it does not pull the TPOT percentiles down) and meets the TPOT SLO trivially.
A failed request (ok False) misses the SLO whatever its timings.

Goodput (DistServe) is the highest request rate at which at least 90% of the requests meet both SLOs. `goodput()`
returns the highest *measured* rate whose attainment reaches the target, even when a lower rate missed it (noise);
`goodput_estimate()` adds a linear interpolation between that rate and the next measured rate above it, which
estimates where attainment crosses the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

QUANTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    arrival_s: float
    """When it was sent, seconds from the start of the run."""
    input_tokens: int
    output_tokens: int
    """Tokens produced (received by the client)."""
    queue_s: float
    """The router's accepted -> prefill started, from the final message (nan when absent)."""
    ttft_s: float
    tpot_s: float
    e2e_s: float
    itl_s: tuple[float, ...]
    ok: bool
    error: str = ""
    """"" when ok, else the gRPC status code name and message (or "timeout: ...")."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"slo.{name}: must be a number > 0, got {value!r}")

    def met(self, record: RequestRecord) -> bool:
        if not record.ok or not record.ttft_s <= self.ttft_s:
            return False
        return record.output_tokens <= 1 or record.tpot_s <= self.tpot_s


def record_from_stream(request_id: str, arrival_s: float, input_tokens: int, sent: float,
                       token_times: Sequence[tuple[float, int]], end: float, queue_s: float = math.nan,
                       ok: bool = True, error: str = "") -> RequestRecord:
    """A record from client clock readings: `sent`, then (time, tokens in the message) per message, then `end`."""
    tokens = sum(n for _, n in token_times)
    itl: list[float] = []
    previous = None
    for t, n in token_times:
        if n <= 0:
            continue
        if previous is not None:
            itl.append(t - previous)
        itl.extend([0.0] * (n - 1))
        previous = t
    first = next((t for t, n in token_times if n > 0), None)
    ttft = first - sent if first is not None else math.nan
    tpot = (previous - first) / (tokens - 1) if tokens > 1 else math.nan
    return RequestRecord(request_id, arrival_s, input_tokens, tokens, queue_s, ttft, tpot, end - sent, tuple(itl),
                         ok, error)


def percentiles(values: Iterable[float], qs: Sequence[float] = QUANTILES) -> dict[str, float]:
    """{"p50": ..., ...} over the finite values (nan and inf are dropped); all nan when none is left."""
    array = np.asarray([v for v in values if v is not None], dtype=float)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {f"p{_label(q)}": math.nan for q in qs}
    return {f"p{_label(q)}": float(v) for q, v in zip(qs, np.percentile(array, list(qs)))}


def attainment(records: Sequence[RequestRecord], slo: SLO) -> float:
    """The share of all requests (failed ones count as misses) meeting both SLOs; nan for no requests."""
    if not records:
        return math.nan
    return sum(slo.met(r) for r in records) / len(records)


def attainment_series(records: Sequence[RequestRecord], slo: SLO, window_s: float = 10.0,
                      step_s: float = 1.0) -> list[tuple[float, float]]:
    """(t, attainment of the requests that arrived in [t - window_s, t)) every step_s; windows with no request
    are left out."""
    if not records:
        return []
    ordered = sorted(records, key=lambda r: r.arrival_s)
    arrivals = np.array([r.arrival_s for r in ordered])
    met = np.array([slo.met(r) for r in ordered], dtype=float)
    series = []
    for t in np.arange(step_s, arrivals[-1] + step_s + 1e-9, step_s):
        lo, hi = np.searchsorted(arrivals, [t - window_s, t])
        if hi > lo:
            series.append((float(t), float(met[lo:hi].mean())))
    return series


@dataclass(frozen=True)
class Summary:
    requests: int
    ok: int
    failed: int
    duration_s: float
    request_throughput: float
    """Successful requests per second."""
    output_throughput: float
    """Output tokens received per second (failed requests' tokens included)."""
    slo: SLO
    attainment: float
    ttft_s: dict[str, float]
    tpot_s: dict[str, float]
    itl_s: dict[str, float]
    e2e_s: dict[str, float]
    queue_s: dict[str, float]
    input_tokens: dict[str, float]
    output_tokens: dict[str, float]
    errors: dict[str, int]
    """Failed requests by error kind (the status code name before the first ':')."""

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(records: Sequence[RequestRecord], slo: SLO, duration_s: float) -> Summary:
    """Counts, throughput, percentiles and SLO attainment of one run; latencies from successful requests only."""
    done = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            kind = r.error.split(":", 1)[0] or "unknown"
            errors[kind] = errors.get(kind, 0) + 1
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: math.nan)
    return Summary(
        requests=len(records), ok=len(done), failed=len(records) - len(done), duration_s=duration_s,
        request_throughput=per_s(len(done)), output_throughput=per_s(sum(r.output_tokens for r in records)),
        slo=slo, attainment=attainment(records, slo),
        ttft_s=percentiles(r.ttft_s for r in done), tpot_s=percentiles(r.tpot_s for r in done),
        itl_s=percentiles(x for r in done for x in r.itl_s), e2e_s=percentiles(r.e2e_s for r in done),
        queue_s=percentiles(r.queue_s for r in done),
        input_tokens=percentiles(r.input_tokens for r in records),
        output_tokens=percentiles(r.output_tokens for r in done), errors=errors)


@dataclass(frozen=True)
class GoodputEstimate:
    rate: float
    """The highest measured rate whose attainment >= target; 0.0 when none reaches it."""
    interpolated: float
    """Where attainment crosses the target, linearly between `rate` and the next measured rate above it; `rate`
    when no measured rate above it (goodput is then at least `rate`)."""
    target: float
    points: tuple[tuple[float, float], ...]
    """(rate, attainment), sorted by rate."""

    def to_dict(self) -> dict:
        return {"rate": self.rate, "interpolated": self.interpolated, "target": self.target,
                "points": [list(p) for p in self.points]}


def goodput_estimate(points: Iterable[tuple[float, float]], target: float = 0.9) -> GoodputEstimate:
    ordered = tuple(sorted((float(r), float(a)) for r, a in points))
    passing = [(r, a) for r, a in ordered if a >= target]
    if not passing:
        return GoodputEstimate(0.0, 0.0, target, ordered)
    rate, high = passing[-1]
    above = [(r, a) for r, a in ordered if r > rate]
    interpolated = rate
    if above:
        next_rate, low = above[0]
        interpolated = rate + (high - target) / (high - low) * (next_rate - rate)
    return GoodputEstimate(rate, interpolated, target, ordered)


def goodput(points: Iterable[tuple[float, float]], target: float = 0.9) -> float:
    """The highest measured rate whose attainment >= target (0.0 when none does)."""
    return goodput_estimate(points, target).rate


@dataclass(frozen=True)
class GoodputSearch:
    points: tuple[tuple[float, float], ...]
    """(rate, attainment) in the order they were run."""
    goodput: GoodputEstimate


def find_goodput(run: Callable[[float], float], low: float, high: float, tolerance: float, max_runs: int = 8,
                 target: float = 0.9) -> GoodputSearch:
    """Bisect the request rate between `low` and `high` for the goodput, calling `run(rate) -> attainment`.

    Runs `low` (stop if it misses: goodput is below it), then `high` (stop if it passes: goodput is at least `high`),
    then halves the gap between the highest passing and lowest failing rate until it is <= `tolerance` req/s or
    `max_runs` runs were made. Works live (each run a benchmark) and offline (each run a simulation)."""
    if not (0 < low < high) or not math.isfinite(high):
        raise ValueError(f"need 0 < low < high, got low={low!r} high={high!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance: must be > 0, got {tolerance!r}")
    if max_runs < 2:
        raise ValueError(f"max_runs: must be >= 2, got {max_runs!r}")
    points: list[tuple[float, float]] = []

    def measure(rate: float) -> bool:
        value = float(run(rate))
        points.append((rate, value))
        return value >= target

    if measure(low) and not measure(high):
        passing, failing = low, high
        while failing - passing > tolerance and len(points) < max_runs:
            middle = (passing + failing) / 2
            if measure(middle):
                passing = middle
            else:
                failing = middle
    return GoodputSearch(tuple(points), goodput_estimate(points, target))


def _label(q: float) -> str:
    return str(int(q)) if float(q).is_integer() else str(q)
