"""Benchmark workloads: request length distributions, arrival processes, and traces (what `pdserve bench` sends).

A trace is a list of `TraceEntry` (arrival offset in seconds, prompt length, output length), sorted by arrival. On disk
it is JSON lines, one `{"arrival_s": float, "input_tokens": int, "output_tokens": int}` a line, optionally with
`"prefix_id": int, "prefix_tokens": int`: requests with the same prefix_id share their first prefix_tokens tokens (a
system prompt, a document, earlier turns), which is what prefix caching reuses.

Built-in workloads. Every length is a lognormal with the given mean (mu = ln(mean) - sigma^2 / 2), rounded and clipped
to the range; "mean (clipped)" is what 2M samples give after clipping. The shapes are chosen to resemble the public
data sets named; the numbers are ours, not fitted to them.

| workload      | length | lognormal | mean | mean clipped | clip         | shape from                          |
|---------------|--------|-----------|------|--------------|--------------|-------------------------------------|
| chat          | input  | sigma 1.0 | 400  | ~396         | [8, 4096]    | ShareGPT-like chat: short prompts   |
|               | output | sigma 0.8 | 250  | ~244         | [4, 1024]    | with a long tail, long answers      |
| summarization | input  | sigma 0.4 | 4000 | ~3930        | [1024, 7168] | arXiv/LongBench-like summarisation: |
|               | output | sigma 0.4 | 150  | ~150         | [32, 512]    | long documents, short outputs       |
| code          | input  | sigma 0.5 | 1500 | ~1490        | [256, 4096]  | code completion with file/repo      |
|               | output | sigma 0.6 | 60   | ~60          | [8, 256]     | context, a few lines of output      |

chat is decode-heavy, summarization prefill-heavy: "shift" (chat -> summarization -> chat, a third of the time each,
at the same request rate) moves the load from the decode pool to the prefill pool and back.

Arrivals: "poisson" (exponential gaps, cv 1) or "gamma" (gamma gaps with shape 1/cv^2, same mean rate; cv > 1 is
burstier). Fixed concurrency (closed loop) ignores arrival times and lives in the load generator.

Everything is seeded. Gaps are drawn at rate 1 and divided by the rate, so with `num_requests` the trace at rate r is
exactly `scale_rate(trace at rate 1, r)`; lengths come from their own streams, so they do not depend on the rate.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

ARRIVALS = ("poisson", "gamma")
FIRST_TOKEN_ID = 1000
"""Synthetic prompts use token ids from here up (clear of special tokens)."""
PREFIX_STREAM = 1 << 40
"""Seeds the random stream of a shared prefix apart from every entry's own."""


class TraceError(ValueError):
    """A trace file or trace parameter is malformed; the message names the line and field."""


@dataclass(frozen=True)
class TraceEntry:
    arrival_s: float
    """Seconds from the start of the run."""
    input_tokens: int
    output_tokens: int
    prefix_id: int | None = None
    """Requests with the same prefix_id share their first `prefix_tokens` prompt tokens."""
    prefix_tokens: int = 0



@dataclass(frozen=True)
class LengthDist:
    """A lognormal with this mean (before clipping), rounded to integers and clipped to [low, high]."""

    mean: float
    sigma: float
    low: int
    high: int

    def sample(self, rng: np.random.Generator, n: int, cap: int | None = None) -> np.ndarray:
        mu = math.log(self.mean) - self.sigma ** 2 / 2
        values = np.rint(rng.lognormal(mu, self.sigma, size=n))
        high = self.high if cap is None else min(self.high, cap)
        return np.clip(values, min(self.low, high), high).astype(np.int64)


@dataclass(frozen=True)
class Workload:
    name: str
    input: LengthDist
    output: LengthDist
    description: str = ""


WORKLOADS: dict[str, Workload] = {
    "chat": Workload("chat", LengthDist(400, 1.0, 8, 4096), LengthDist(250, 0.8, 4, 1024),
                     "ShareGPT-like chat"),
    "summarization": Workload("summarization", LengthDist(4000, 0.4, 1024, 7168), LengthDist(150, 0.4, 32, 512),
                              "arXiv/LongBench-like summarisation"),
    "code": Workload("code", LengthDist(1500, 0.5, 256, 4096), LengthDist(60, 0.6, 8, 256),
                     "code completion with context"),
}
NAMED = (*WORKLOADS, "shift", "daily")
DAILY_HOURS = 24
DAILY_TROUGH = 1 / 3
"""The daily swing's quietest hour, as a share of its busiest."""
DAILY_BURSTS = {7: 1.5, 13: 1.5, 19: 1.5}
"""Hour -> rate multiplier of a burst in its first quarter (a release, a batch job, a news spike)."""


@dataclass(frozen=True)
class Phase:
    """`duration_s` seconds of `workload` arriving at `rate` requests/s."""

    workload: Workload
    duration_s: float
    rate: float


def make_trace(workload: Workload | str, rate: float, duration_s: float | None = None,
               num_requests: int | None = None, arrival: str = "poisson", cv: float = 1.0, seed: int = 0,
               max_input_tokens: int | None = None, max_output_tokens: int | None = None) -> list[TraceEntry]:
    """Requests of `workload` arriving at `rate`/s until `duration_s` or `num_requests` (whichever comes first)."""
    workload = get_workload(workload)
    _check_params(rate, duration_s, num_requests, arrival, cv, max_input_tokens, max_output_tokens)
    arrival_ss, input_ss, output_ss = np.random.SeedSequence(seed).spawn(3)
    times = _arrivals(np.random.default_rng(arrival_ss), rate, duration_s, num_requests, arrival, cv)
    inputs = workload.input.sample(np.random.default_rng(input_ss), len(times), max_input_tokens)
    outputs = workload.output.sample(np.random.default_rng(output_ss), len(times), max_output_tokens)
    return [TraceEntry(float(t), int(i), int(o)) for t, i, o in zip(times, inputs, outputs)]


def phase_trace(phases: Sequence[Phase], seed: int = 0, arrival: str = "poisson", cv: float = 1.0,
                max_input_tokens: int | None = None, max_output_tokens: int | None = None) -> list[TraceEntry]:
    """The phases one after another in time; phase i starts when phase i-1's duration ends (seeded per phase)."""
    if not phases:
        raise TraceError("phases: must not be empty")
    entries: list[TraceEntry] = []
    start = 0.0
    for i, phase in enumerate(phases):
        if not phase.duration_s > 0:
            raise TraceError(f"phases[{i}].duration_s: must be > 0, got {phase.duration_s!r}")
        part = make_trace(phase.workload, phase.rate, duration_s=phase.duration_s, arrival=arrival, cv=cv,
                          seed=_phase_seed(seed, i), max_input_tokens=max_input_tokens,
                          max_output_tokens=max_output_tokens)
        entries.extend(dataclasses.replace(e, arrival_s=start + e.arrival_s) for e in part)
        start += phase.duration_s
    return entries


def parse_phases(spec: str) -> list[Phase]:
    """Phases from "workload:duration_s:rate,..." (e.g. "chat:200:10,summarization:200:2,chat:200:10")."""
    phases = []
    for i, part in enumerate(p.strip() for p in spec.split(",")):
        fields = part.split(":")
        if len(fields) != 3:
            raise TraceError(f"phases[{i}]: {part!r} is not workload:duration_s:rate")
        try:
            duration_s, rate = float(fields[1]), float(fields[2])
        except ValueError:
            raise TraceError(f"phases[{i}]: duration_s and rate must be numbers, got {part!r}") from None
        if not (math.isfinite(duration_s) and duration_s > 0 and math.isfinite(rate) and rate > 0):
            raise TraceError(f"phases[{i}]: duration_s and rate must be finite and > 0, got {part!r}")
        phases.append(Phase(get_workload(fields[0]), duration_s, rate))
    return phases


def scale_phases(phases: Sequence[Phase], factor: float) -> list[Phase]:
    """The same phases, as long as before, with `factor` times the arrival rate."""
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise TraceError(f"factor: must be a finite number > 0, got {factor!r}")
    return [Phase(p.workload, p.duration_s, p.rate * factor) for p in phases]


def shift_phases(rate: float, duration_s: float) -> list[Phase]:
    """The built-in "shift": chat, then summarization, then chat, a third of `duration_s` each, all at `rate`."""
    third = duration_s / 3
    return [Phase(WORKLOADS["chat"], third, rate), Phase(WORKLOADS["summarization"], third, rate),
            Phase(WORKLOADS["chat"], third, rate)]


def daily_phases(peak_rate: float, duration_s: float) -> list[Phase]:
    """The built-in "daily": a day compressed into `duration_s` (24 phases, one per hour) of chat traffic whose rate
    swings as a cosine from a third of `peak_rate` (hour 0) up to it (hour 12) and back, with a burst of 1.5x the
    hour's rate in the first quarter of hours 7, 13 and 19."""
    hour = duration_s / DAILY_HOURS
    phases = []
    for h in range(DAILY_HOURS):
        rate = peak_rate * (DAILY_TROUGH + (1 - DAILY_TROUGH) * (1 - math.cos(2 * math.pi * h / DAILY_HOURS)) / 2)
        burst = DAILY_BURSTS.get(h)
        if burst is not None:
            phases.append(Phase(WORKLOADS["chat"], hour / 4, rate * burst))
        phases.append(Phase(WORKLOADS["chat"], hour * 0.75 if burst is not None else hour, rate))
    return phases


def named_trace(name: str, rate: float, duration_s: float | None = None, num_requests: int | None = None,
                arrival: str = "poisson", cv: float = 1.0, seed: int = 0, max_input_tokens: int | None = None,
                max_output_tokens: int | None = None) -> list[TraceEntry]:
    """A built-in workload by name ("chat", "summarization", "code", "shift" or "daily": `rate` is its peak).

    "shift" with `duration_s` has phases of a third of it each (cut to `num_requests` if given too); with only
    `num_requests`, a third of the requests each (the last phase takes the remainder), back to back."""
    if name == "daily":
        if duration_s is None:
            raise TraceError("duration_s: the daily workload needs a duration (the day is compressed into it)")
        entries = phase_trace(daily_phases(rate, duration_s), seed, arrival, cv, max_input_tokens, max_output_tokens)
        return entries[:num_requests] if num_requests is not None else entries
    if name != "shift":
        return make_trace(name, rate, duration_s, num_requests, arrival, cv, seed, max_input_tokens,
                          max_output_tokens)
    _check_params(rate, duration_s, num_requests, arrival, cv, max_input_tokens, max_output_tokens)
    if duration_s is not None:
        entries = phase_trace(shift_phases(rate, duration_s), seed, arrival, cv, max_input_tokens, max_output_tokens)
        return entries[:num_requests] if num_requests is not None else entries
    counts = (num_requests // 3, num_requests // 3, num_requests - 2 * (num_requests // 3))
    entries, start = [], 0.0
    for i, (phase, count) in enumerate(zip(shift_phases(rate, 3.0), counts)):
        if count:
            part = make_trace(phase.workload, rate, num_requests=count, arrival=arrival, cv=cv,
                              seed=_phase_seed(seed, i), max_input_tokens=max_input_tokens,
                              max_output_tokens=max_output_tokens)
            entries.extend(dataclasses.replace(e, arrival_s=start + e.arrival_s) for e in part)
            start += part[-1].arrival_s
    return entries


def get_workload(workload: Workload | str) -> Workload:
    if isinstance(workload, Workload):
        return workload
    if workload not in WORKLOADS:
        raise TraceError(f"workload: {workload!r} is not one of {sorted(WORKLOADS)}")
    return WORKLOADS[workload]


def scale_rate(entries: Iterable[TraceEntry], factor: float) -> list[TraceEntry]:
    """The same requests arriving `factor` times as fast (arrival times divided by `factor`)."""
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise TraceError(f"factor: must be a finite number > 0, got {factor!r}")
    return [dataclasses.replace(e, arrival_s=e.arrival_s / factor) for e in entries]


def mean_rate(entries: Sequence[TraceEntry]) -> float:
    """Requests per second over the trace's span (first to last arrival); nan below two entries."""
    if len(entries) < 2:
        return math.nan
    span = entries[-1].arrival_s - entries[0].arrival_s
    return (len(entries) - 1) / span if span > 0 else math.inf


def trace_stats(entries: Sequence[TraceEntry]) -> dict[str, float]:
    """Count, span, mean rate and length figures of a trace, for the report."""
    inputs = np.array([e.input_tokens for e in entries], dtype=float)
    outputs = np.array([e.output_tokens for e in entries], dtype=float)
    gaps = np.diff([e.arrival_s for e in entries])

    def stat(fn, values):
        return float(fn(values)) if len(values) else math.nan

    return {"requests": len(entries), "span_s": entries[-1].arrival_s if entries else 0.0,
            "mean_rate": mean_rate(entries),
            "interarrival_cv": stat(lambda g: np.std(g) / np.mean(g) if np.mean(g) > 0 else math.nan, gaps),
            "input_mean": stat(np.mean, inputs), "input_p50": stat(np.median, inputs),
            "input_max": stat(np.max, inputs), "output_mean": stat(np.mean, outputs),
            "output_p50": stat(np.median, outputs), "output_max": stat(np.max, outputs)}


def read_trace(path: str) -> list[TraceEntry]:
    """A JSON-lines trace, sorted by arrival. Blank lines are skipped, other keys ignored; a bad line raises
    TraceError naming the file, line number and field."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                entries.append(_parse_line(raw, f"{path} line {number}"))
    if not entries:
        raise TraceError(f"{path}: no entries")
    return sorted(entries, key=lambda e: e.arrival_s)


def cap_lengths(entry: TraceEntry, max_input: int | None, max_output: int | None) -> TraceEntry:
    """The entry with its lengths capped (a shared prefix shrinks with its prompt)."""
    inputs = min(entry.input_tokens, max_input or entry.input_tokens)
    return dataclasses.replace(entry, input_tokens=inputs, output_tokens=min(entry.output_tokens,
                                                                              max_output or entry.output_tokens),
                               prefix_tokens=min(entry.prefix_tokens, inputs))


def make_prompt_ids(seed: int, index: int, entry: TraceEntry, vocab_size: int) -> tuple[int, ...]:
    """Random token ids for trace entry `index`: its shared prefix (the same for every entry with its prefix_id),
    then tokens of its own."""
    shared: list[int] = []
    if entry.prefix_id is not None and entry.prefix_tokens:
        rng = np.random.default_rng([seed, PREFIX_STREAM, entry.prefix_id])
        shared = rng.integers(FIRST_TOKEN_ID, vocab_size, size=entry.prefix_tokens).tolist()
    rng = np.random.default_rng([seed, index])
    return tuple(shared + rng.integers(FIRST_TOKEN_ID, vocab_size, size=entry.input_tokens - len(shared)).tolist())


def write_trace(path: str, entries: Iterable[TraceEntry]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e in entries:
            line = {"arrival_s": e.arrival_s, "input_tokens": e.input_tokens, "output_tokens": e.output_tokens}
            if e.prefix_id is not None:
                line.update(prefix_id=e.prefix_id, prefix_tokens=e.prefix_tokens)
            f.write(json.dumps(line) + "\n")


def _parse_line(raw: str, where: str) -> TraceEntry:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not JSON ({e.msg})") from e
    if not isinstance(value, dict):
        raise TraceError(f"{where}: must be a JSON object, got {type(value).__name__}")
    for field in ("arrival_s", "input_tokens", "output_tokens"):
        if field not in value:
            raise TraceError(f"{where}: {field}: missing")
    arrival = value["arrival_s"]
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not math.isfinite(arrival) \
            or arrival < 0:
        raise TraceError(f"{where}: arrival_s: must be a finite number >= 0, got {arrival!r}")
    for field in ("input_tokens", "output_tokens"):
        tokens = value[field]
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise TraceError(f"{where}: {field}: must be an integer >= 1, got {tokens!r}")
    return TraceEntry(float(arrival), value["input_tokens"], value["output_tokens"], *_parse_prefix(value, where))


def _parse_prefix(value: dict, where: str) -> tuple[int | None, int]:
    """(prefix_id, prefix_tokens) of a trace line; both or neither, prefix_tokens <= input_tokens."""
    if "prefix_id" not in value and "prefix_tokens" not in value:
        return None, 0
    for field in ("prefix_id", "prefix_tokens"):
        number = value.get(field)
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise TraceError(f"{where}: {field}: must be an integer >= 0 (given with the other), got {number!r}")
    if value["prefix_tokens"] > value["input_tokens"]:
        raise TraceError(f"{where}: prefix_tokens: {value['prefix_tokens']} is more than input_tokens "
                         f"{value['input_tokens']}")
    return value["prefix_id"], value["prefix_tokens"]


def _arrivals(rng: np.random.Generator, rate: float, duration_s: float | None, num_requests: int | None,
              arrival: str, cv: float) -> np.ndarray:
    """Arrival times from 0, at `rate`/s, until `duration_s` (exclusive) or `num_requests`."""
    def gaps(n: int) -> np.ndarray:  # mean 1, then / rate
        if arrival == "poisson":
            return rng.standard_exponential(n) / rate
        shape = 1.0 / cv ** 2
        return rng.standard_gamma(shape, n) / shape / rate

    if duration_s is None:
        return np.cumsum(gaps(num_requests))
    chunk = max(16, int(rate * duration_s * 1.2) + 16)
    times = np.cumsum(gaps(chunk))
    while times[-1] < duration_s and (num_requests is None or len(times) < num_requests):
        times = np.concatenate([times, times[-1] + np.cumsum(gaps(chunk))])
    times = times[times < duration_s]
    return times[:num_requests] if num_requests is not None else times


def _check_params(rate: float, duration_s: float | None, num_requests: int | None, arrival: str, cv: float,
                  max_input_tokens: int | None, max_output_tokens: int | None) -> None:
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise TraceError(f"rate: must be a finite number > 0, got {rate!r}")
    if duration_s is None and num_requests is None:
        raise TraceError("give duration_s or num_requests (or both)")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise TraceError(f"duration_s: must be a finite number > 0, got {duration_s!r}")
    if num_requests is not None and (isinstance(num_requests, bool) or not isinstance(num_requests, int)
                                     or num_requests < 1):
        raise TraceError(f"num_requests: must be an integer >= 1, got {num_requests!r}")
    if arrival not in ARRIVALS:
        raise TraceError(f"arrival: {arrival!r} is not one of {ARRIVALS}")
    if not (math.isfinite(cv) and cv > 0):
        raise TraceError(f"cv: must be a finite number > 0, got {cv!r}")
    for name, cap in (("max_input_tokens", max_input_tokens), ("max_output_tokens", max_output_tokens)):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise TraceError(f"{name}: must be an integer >= 1, got {cap!r}")


def _phase_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
