"""Capacity planning: for a trace and N simulated workers, how every static P:D split and the controller do.

`pdserve plan` runs `bench.simulator.Simulation` (the real engines, routing and controller on a virtual clock) once
per candidate at the trace's own rate, for attainment and latency percentiles, and then searches the rate for its
goodput (DistServe: the highest request rate at which >= 90% of requests meet both SLOs). The search asks the traffic
(`bench.traffic`) for itself at other rates: a recorded trace replays faster, phases keep their length and get busier.
Every candidate is judged on the same requests at each rate; each candidate runs in a process of its own.
`PlanSetup.fast` swaps in `bench.fast_simulator.FastSimulation`, a step-level model of the workers (same results
within a point of attainment on the checked scenarios, tens of times faster; see its docstring for what it leaves out).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

from pdserve.bench.fast_simulator import FastSimulation
from pdserve.bench.metrics import SLO, attainment, attainment_series, find_goodput, percentiles
from pdserve.bench.sim_setup import PoolSample, SimResult, SimSetup
from pdserve.bench.simulator import Simulation
from pdserve.bench.traffic import Traffic
from pdserve.bench.workloads import TraceEntry, mean_rate
from pdserve.controller.config import ControllerConfig
from pdserve.controller.decision import Action
from pdserve.controller.policy import BUILT_IN
from pdserve.engine.config import EngineConfig
from pdserve.engine.cost_model import Link

TARGET_ATTAINMENT = 0.9

Progress = Callable[[str], None]
"""Told a one-line status as simulations finish (`pdserve plan` shows it on stderr)."""


@dataclass(frozen=True)
class Candidate:
    """A starting split, static (no controller) or controlled."""

    prefill: int
    decode: int
    controlled: bool
    policy: str = ""
    """The policy that ticks, when controlled ("": the built-in ratio controller)."""

    @property
    def name(self) -> str:
        if not self.controlled:
            return f"{self.prefill}:{self.decode}"
        label = self.policy.rpartition(":")[2] if self.policy not in ("", BUILT_IN) else "controller"
        return f"{label} (from {self.prefill}:{self.decode})"


@dataclass(frozen=True)
class PlanSetup:
    engine: EngineConfig
    workers: int
    slo: SLO
    controller: ControllerConfig
    link: Link = Link.NETWORK
    layerwise: bool = False
    """KV streamed layer by layer during the prefill's last step."""
    role_switch_s: float = 5.0
    window_s: float = 30.0
    """The controller's traffic window."""
    hand_on_after_s: float | None = None
    """A leaving decode worker hands on what it still runs this long into its drain (None: waits for it)."""
    search_low: float = 0.5
    """Goodput search range, as multiples of the trace's own rate."""
    search_high: float = 3.0
    search_runs: int = 6
    search: bool = True
    prefill_counts: tuple[int, ...] | None = None
    """Only the static splits with these prefill counts (None: all of them)."""
    controller_prefill: int | None = None
    """The controller's starting prefill count (None: half the workers)."""
    controller_decode: int | None = None
    """The controller's starting decode count (None: the rest of `workers`); with a worker budget
    (`controller.min_workers`/`max_workers`) the start may differ from `workers`."""
    policy: str = ""
    """The policy that ticks ("": the built-in ratio controller; "package.module:Class": a plug-in)."""
    policy_config: Mapping[str, Any] = field(default_factory=dict)
    worker_start_s: float = 60.0
    """An added worker's start, until it serves."""
    routing: str = "kv_aware"
    """As router.routing (with engine.prefix_caching)."""
    fast: bool = False
    """Run `bench.fast_simulator.FastSimulation` (a step-level model, much faster) instead of the exact simulator."""


@dataclass(frozen=True)
class CandidateReport:
    name: str
    prefill: int
    decode: int
    controlled: bool
    attainment: float
    """At the trace's own rate."""
    goodput_rps: float
    """Highest rate (requests/s) with >= 90% attainment; nan when not searched."""
    goodput_points: tuple[tuple[float, float], ...]
    ttft_s: dict[str, float]
    tpot_s: dict[str, float]
    moves: int
    lost: int
    pool_samples: tuple[PoolSample, ...] = field(default=(), repr=False)
    attainment_series: tuple[tuple[float, float], ...] = field(default=(), repr=False)
    """(time, attainment of the requests that arrived in the 10 s before), at the trace's rate."""
    cache_hit_rate: float = 0.0
    """Share of prompt tokens the prefill workers took from their prefix caches, at the trace's rate."""
    adds: int = 0
    removes: int = 0
    worker_seconds: float = 0.0
    """Machine time the workers held (serving, starting, draining), at the trace's rate."""
    duration_s: float = 0.0
    """Virtual seconds from the first arrival to the last finish, at the trace's rate."""

    @property
    def mean_workers(self) -> float:
        return self.worker_seconds / self.duration_s if self.duration_s > 0 else float(self.prefill + self.decode)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["pool_samples"] = [asdict(s) for s in self.pool_samples]
        values["mean_workers"] = self.mean_workers
        return values


def candidates(workers: int, prefill_counts: Sequence[int] | None = None,
               controller_prefill: int | None = None, controller_decode: int | None = None,
               policy: str = "") -> list[Candidate]:
    """Every static split P + D = N (P, D >= 1), or those with the given P, then the controller (or `policy`)
    starting from the even split (or from `controller_prefill`:`controller_decode`)."""
    counts = range(1, workers) if prefill_counts is None else sorted(set(prefill_counts))
    start = workers // 2 if controller_prefill is None else controller_prefill
    start_decode = workers - start if controller_decode is None else controller_decode
    if any(not 1 <= p < workers for p in counts) or start < 1 or start_decode < 1:
        raise ValueError(f"--splits: each split needs 1 <= prefill < {workers} and a decode worker, got "
                         f"{[*counts, start]}")
    static = [Candidate(p, workers - p, False) for p in counts]
    return static + [Candidate(start, start_decode, True, policy)]


def simulate(setup: PlanSetup, candidate: Candidate, trace: Sequence[TraceEntry]) -> SimResult:
    sim = SimSetup(engine=setup.engine, prefill=candidate.prefill, decode=candidate.decode, slo=setup.slo,
                   controller=setup.controller if candidate.controlled else None, link=setup.link,
                   layerwise=setup.layerwise, role_switch_s=setup.role_switch_s, window_s=setup.window_s,
                   hand_on_after_s=setup.hand_on_after_s, routing=setup.routing,
                   policy=candidate.policy if candidate.controlled else "", policy_config=setup.policy_config,
                   worker_start_s=setup.worker_start_s)
    return (FastSimulation if setup.fast else Simulation)(sim, trace).run()


def evaluate(setup: PlanSetup, candidate: Candidate, traffic: Traffic,
             progress: Progress | None = None) -> CandidateReport:
    """One candidate: a run at the traffic's own rate, then (if asked) the goodput search around it."""
    trace = traffic.at(1.0)
    result = simulate(setup, candidate, trace)
    ok = [r for r in result.records if r.ok]
    points: tuple[tuple[float, float], ...] = ()
    goodput = math.nan
    if setup.search:
        rate = mean_rate(trace)

        def run(scaled_rate: float) -> float:
            scaled = traffic.at(scaled_rate / rate)
            value = attainment(simulate(setup, candidate, scaled).records, setup.slo)
            if progress is not None:
                progress(f"{candidate.name}: attainment {value:.3f} at {scaled_rate:.2f} req/s")
            return value

        search = find_goodput(run, setup.search_low * rate, setup.search_high * rate, tolerance=0.05 * rate,
                              max_runs=setup.search_runs, target=TARGET_ATTAINMENT)
        points, goodput = search.points, search.goodput.rate
    return CandidateReport(
        name=candidate.name, prefill=candidate.prefill, decode=candidate.decode, controlled=candidate.controlled,
        attainment=attainment(result.records, setup.slo), goodput_rps=goodput, goodput_points=points,
        ttft_s=percentiles(r.ttft_s for r in ok), tpot_s=percentiles(r.tpot_s for r in ok),
        moves=sum(1 for d in result.decisions if d.action is Action.MOVE),
        lost=sum(1 for r in result.records if not r.ok), pool_samples=result.pool_samples,
        attainment_series=tuple(attainment_series(result.records, setup.slo)), cache_hit_rate=result.cache_hit_rate,
        adds=sum(len(d.add) for d in result.decisions), removes=sum(len(d.remove) for d in result.decisions),
        worker_seconds=result.worker_seconds, duration_s=result.duration_s)


def plan(setup: PlanSetup, traffic: Traffic, processes: int | None = None,
         progress: Progress | None = None) -> list[CandidateReport]:
    """Every candidate for `setup.workers` workers, in parallel processes; static splits first, controller last.
    `progress` hears of each finished candidate (and, in one process, of each rate the search tried)."""
    todo = candidates(setup.workers, setup.prefill_counts, setup.controller_prefill, setup.controller_decode,
                      setup.policy)
    processes = processes or min(len(todo), os.cpu_count() or 1)
    tell = progress or (lambda _: None)
    if processes <= 1:
        reports = []
        for c in todo:
            reports.append(evaluate(setup, c, traffic, progress))
            tell(f"{len(reports)}/{len(todo)} candidates done ({c.name})")
        return reports
    with ProcessPoolExecutor(processes) as pool:
        futures = [pool.submit(evaluate, setup, c, traffic) for c in todo]
        for done, _ in enumerate(as_completed(futures), 1):
            tell(f"{done}/{len(todo)} candidates done")
        return [f.result() for f in futures]


def best_static(reports: Sequence[CandidateReport]) -> CandidateReport:
    static = [r for r in reports if not r.controlled]
    return max(static, key=lambda r: (r.goodput_rps if math.isfinite(r.goodput_rps) else -1, r.attainment))
