"""What the goodput search replays at a rate multiple: a recorded trace, or phases that are regenerated.

Goodput is the highest request rate at which >= 90% of requests meet both SLOs, so the planner needs the same traffic
at other rates. Two ways, with different meanings for traffic that changes over time:

- `RecordedTrace` (a trace file): the same requests, arrival times divided by the factor. Exact prompts, but a
  10-minute trace at 5x lasts 2 minutes, so its phases shorten with the rate and a controller has less time to follow
  them.
- `PhasedTraffic` (built-in workloads, `--phases`): each phase keeps its duration and its arrival rate is multiplied,
  regenerated from the same seed. This is what "the same traffic, busier" means for a service whose mix shifts over
  minutes, and what the phase-shifting goodput in BENCHMARKS.md uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.bench.workloads import Phase, TraceEntry, phase_trace, scale_phases, scale_rate


@dataclass(frozen=True)
class RecordedTrace:
    entries: tuple[TraceEntry, ...]

    def at(self, factor: float) -> list[TraceEntry]:
        return list(self.entries) if factor == 1 else scale_rate(self.entries, factor)

    def describe(self) -> str:
        return "a recorded trace, replayed faster for the search (its phases shorten with the rate)"


@dataclass(frozen=True)
class PhasedTraffic:
    phases: tuple[Phase, ...]
    seed: int = 0

    def at(self, factor: float) -> list[TraceEntry]:
        return phase_trace(scale_phases(self.phases, factor), seed=self.seed)

    def describe(self) -> str:
        parts = ", ".join(f"{p.workload.name} {p.duration_s:g}s @ {p.rate:g}/s" for p in self.phases)
        return f"phases {parts} (seed {self.seed}); the search scales each phase's rate, keeping its duration"


Traffic = RecordedTrace | PhasedTraffic


def traffic_of(entries: Sequence[TraceEntry] | None = None, phases: Sequence[Phase] | None = None,
               seed: int = 0) -> Traffic:
    """A recorded trace or phases (exactly one of them)."""
    if (entries is None) == (phases is None):
        raise ValueError("traffic_of: give a trace or phases, not both or neither")
    return RecordedTrace(tuple(entries)) if entries is not None else PhasedTraffic(tuple(phases), seed)
