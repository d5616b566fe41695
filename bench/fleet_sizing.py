"""The static fleet sized for the peak: the fewest workers, on their best split, whose SLO attainment stays at the
target (90%) in every window of the trace, its busiest included.

An autoscaler's saving in worker-seconds means something only against this fleet. A fleet merely as large as the
autoscaler's budget may be larger than the peak needs: the first daily run in BENCHMARKS.md ("A day of traffic")
compared against 12 workers where 9 held every hour, and reported a saving twice the real one. `pdserve plan
--peak-fleet` finds this fleet by simulation, from `largest` workers down: for each size, the splits next to the last
one that held (the same prefill share, one either side), until no split of a size holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from pdserve.bench.metrics import SLO, RequestRecord, attainment
from pdserve.bench.planner import TARGET_ATTAINMENT, Candidate, PlanSetup, Progress, simulate
from pdserve.bench.workloads import TraceEntry


@dataclass(frozen=True)
class StaticFleet:
    prefill: int
    decode: int
    worst_window: float
    """Attainment of its worst window."""
    attainment: float
    """Over the whole trace."""

    @property
    def workers(self) -> int:
        return self.prefill + self.decode

    @property
    def name(self) -> str:
        return f"{self.prefill}:{self.decode}"


def worst_window(records: Sequence[RequestRecord], slo: SLO, window_s: float) -> float:
    """The lowest attainment over windows of `window_s` seconds of arrivals, counted from the first; a last window
    shorter than half of `window_s` joins the one before it."""
    if not records:
        return math.nan
    start = min(r.arrival_s for r in records)
    span = max(r.arrival_s for r in records) - start
    last = int(span // window_s)
    merge_last = last > 0 and span - last * window_s < window_s / 2
    windows: dict[int, list[RequestRecord]] = {}
    for r in records:
        index = int((r.arrival_s - start) // window_s)
        windows.setdefault(index - 1 if merge_last and index == last else index, []).append(r)
    return min(attainment(members, slo) for members in windows.values())


def size_static_fleet(setup: PlanSetup, trace: Sequence[TraceEntry], largest: int, prefill_share: float,
                      window_s: float, processes: int = 1, progress: Progress | None = None) -> StaticFleet | None:
    """The fewest workers up to `largest` whose best split holds TARGET_ATTAINMENT in every `window_s` window;
    None when no split of `largest` does. `prefill_share` (P / N of a good split, e.g. the plan's best) says where
    to look first."""
    tell = progress or (lambda _: None)
    held: StaticFleet | None = None
    workers, share = largest, prefill_share
    while workers >= 2:
        tried = _try_splits(setup, trace, workers, share, window_s, processes)
        holding = [f for f in tried if f.worst_window >= TARGET_ATTAINMENT]
        tell(f"peak fleet: {workers} workers: " + ", ".join(f"{f.name} {f.worst_window:.3f}" for f in tried))
        if not holding:
            return held
        held = max(holding, key=lambda f: (f.worst_window, f.attainment))
        workers, share = workers - 1, held.prefill / held.workers
    return held


def _try_splits(setup: PlanSetup, trace: Sequence[TraceEntry], workers: int, share: float, window_s: float,
                processes: int) -> list[StaticFleet]:
    middle = min(max(round(share * workers), 1), workers - 1)
    splits = sorted({p for p in (middle - 1, middle, middle + 1) if 1 <= p <= workers - 1})
    jobs = [(setup, trace, Candidate(p, workers - p, False), window_s) for p in splits]
    if processes <= 1:
        return [_judge(*job) for job in jobs]
    with ProcessPoolExecutor(min(processes, len(jobs))) as pool:
        return list(pool.map(_judge, *zip(*jobs)))


def _judge(setup: PlanSetup, trace: Sequence[TraceEntry], candidate: Candidate, window_s: float) -> StaticFleet:
    records = simulate(setup, candidate, trace).records
    return StaticFleet(candidate.prefill, candidate.decode, worst_window(records, setup.slo, window_s),
                       attainment(records, setup.slo))
