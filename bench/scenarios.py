"""A seeded family of serving scenarios: what the controller is tuned and judged on instead of one trace.

A `Scenario` is a cluster (hardware, model, tensor parallelism, worker count, SLOs) and ten minutes of traffic whose
mix of chat, long documents (the summarization workload) and code changes over time, slowly or at once, with bursts
on top. `generate(seed)` draws one; the same seed always gives the same scenario. The draw, per scenario:

| what        | drawn from                                                                                          |
|-------------|-----------------------------------------------------------------------------------------------------|
| hardware    | h100, h200, a100                                                                                    |
| model       | llama-3-8b (TP 1) or llama-3-70b (TP 2 on h200, TP 4 on h100 and a100)                              |
| workers     | 4 to 16                                                                                             |
| SLOs        | TPOT 2.5-4x a lone decode step (1.5k context); TTFT 3-6x a lone 4k-token prefill, at least 0.3 s    |
| phases      | 3 to 5 over 600 s, each a mix: one workload (half the time) or a blend weighted towards one         |
| load        | each phase's rate 0.55-1.0 of what the whole fleet carries of that mix (no phase idles)            |
| shifts      | each change of phase is sudden (half the time) or a ramp of 40-150 s into the next phase            |
| bursts      | none, one or two: 1.5-2.5x the rate for 10-30 s                                                     |

The fleet's capacity for a mix (`capacity_rps`) uses the controller's own queueing formulas on the roofline cost
model with an ideal fractional split: it only keeps the phases comparable, the judge is the simulator. The same model
says how much any controller could gain on a scenario (`switching_headroom`): when one split suits every phase,
nothing.

`ScenarioTraffic` makes the requests: a non-homogeneous Poisson process (the rate and the mix piecewise linear in
time, times the bursts) by time rescaling, so `at(factor)` is the same traffic busier: the same unit-rate events,
denser in time, the first requests' workloads and lengths unchanged. It is a `bench.traffic` source, so
`bench.planner` searches its goodput like any other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.bench.workloads import WORKLOADS, TraceEntry
from pdserve.controller.demand import DECODE_UTILISATION, PREFILL_UTILISATION_CAP, PREFILL_UTILISATION_FLOOR
from pdserve.controller.perf_model import decode_capacity, prefill_max_utilisation
from pdserve.engine.cost_model import CostModel
from pdserve.engine.hardware import hardware as hardware_named
from pdserve.engine.shapes import shape

MIX = ("chat", "summarization", "code")
"""The workloads a mix blends, in the order of `Knot.shares`."""
DURATION_S = 600.0
GRID_S = 0.01
"""Resolution of the rate's integral (the arrival times are exact to about this)."""
HARDWARE = ("h100", "h200", "a100")
MODELS = ("llama-3-8b", "llama-3-70b")
KV_FRACTION = 0.9
"""Share of accelerator memory for weights and KV (SimSettings' default)."""


@dataclass(frozen=True)
class Knot:
    """The traffic at time `t_s`: requests/s of each workload of `MIX`. Between knots each workload's rate is linear,
    so a ramp from one phase to the next is a cross-fade whose load stays between the two phases' loads."""

    t_s: float
    rates: tuple[float, float, float]

    @property
    def rate(self) -> float:
        return sum(self.rates)

    @property
    def shares(self) -> tuple[float, ...]:
        return tuple(r / self.rate for r in self.rates)


@dataclass(frozen=True)
class Burst:
    start_s: float
    duration_s: float
    factor: float
    """The rate is multiplied by this while the burst lasts."""


@dataclass(frozen=True)
class Scenario:
    seed: int
    hardware: str
    model: str
    tensor_parallel: int
    workers: int
    slo_ttft_s: float
    slo_tpot_s: float
    knots: tuple[Knot, ...]
    """Each workload's rate, linear between knots; a sudden change is two knots a microsecond apart."""
    bursts: tuple[Burst, ...]
    shifts: str
    """How the phases change: "sudden", "slow" or "mixed" (for the table)."""

    @property
    def duration_s(self) -> float:
        return self.knots[-1].t_s

    def describe(self) -> str:
        phases = " > ".join(_mix_name(k.shares) for k in _phase_knots(self.knots))
        return (f"{self.hardware} {self.model.removeprefix('llama-3-')} TP{self.tensor_parallel} x{self.workers}, "
                f"{phases}, {self.shifts} shifts, {len(self.bursts)} burst(s)")


def cost_model(scenario: Scenario) -> CostModel:
    return CostModel(shape(scenario.model), hardware_named(scenario.hardware), scenario.tensor_parallel)


def pool_work(cost: CostModel, shares: Sequence[float], slo_ttft_s: float, slo_tpot_s: float,
              max_num_seqs: int = 256) -> tuple[float, float]:
    """Worker-seconds one request of this mix takes on (prefill, decode), on workers loaded as the controller plans
    them (prefill at the M/D/1 utilisation that meets the TTFT SLO, decode at 0.9 of its SLO-bound throughput)."""
    prefill = decode = 0.0
    for name, share in zip(MIX, shares):
        workload = WORKLOADS[name]
        prompt, output = workload.input.mean, workload.output.mean
        service_s = cost.prefill_seconds(int(prompt))
        utilisation, _ = prefill_max_utilisation(service_s, slo_ttft_s, PREFILL_UTILISATION_FLOOR,
                                                 PREFILL_UTILISATION_CAP)
        context = int(prompt + output / 2)
        batch_cap = min(max_num_seqs, max(1, cost.kv_capacity_tokens(KV_FRACTION) // (context + int(output))))
        tokens_per_s = decode_capacity(cost, context, batch_cap, slo_tpot_s, 1.0).tokens_per_s
        prefill += share * service_s / utilisation
        decode += share * output / (DECODE_UTILISATION * tokens_per_s)
    return prefill, decode


def capacity_rps(cost: CostModel, workers: int, shares: Sequence[float], slo_ttft_s: float,
                 slo_tpot_s: float) -> float:
    """Requests/s that `workers` workers carry of this mix within the SLOs, split ideally between the pools."""
    return workers / sum(pool_work(cost, shares, slo_ttft_s, slo_tpot_s))


def switching_headroom(scenario: Scenario) -> float:
    """What a perfect controller could gain over the best static split, by the same model: the busiest phase's
    capacity multiple with each phase on its own best split (switched at no cost), over the best static split's
    (each phase's rate a multiple of its flat part's; ramps and bursts ignored). 1.0: one split suits every phase."""
    cost, n = cost_model(scenario), scenario.workers
    phases = [(k.rate, pool_work(cost, k.shares, scenario.slo_ttft_s, scenario.slo_tpot_s))
              for k in _phase_knots(scenario.knots)]

    def headroom(prefill: int, rate: float, work: tuple[float, float]) -> float:
        return min(prefill / work[0], (n - prefill) / work[1]) / rate

    static = max(min(headroom(p, rate, work) for rate, work in phases) for p in range(1, n))
    switching = min(max(headroom(p, rate, work) for p in range(1, n)) for rate, work in phases)
    return switching / static


def generate(seed: int) -> Scenario:
    """The scenario of this seed (see the module's table)."""
    rng = np.random.default_rng(seed)
    hardware = str(rng.choice(HARDWARE))
    model = str(rng.choice(MODELS))
    tp = 1 if model == "llama-3-8b" else (2 if hardware == "h200" else 4)
    workers = int(rng.integers(4, 17))
    cost = CostModel(shape(model), hardware_named(hardware), tp)
    slo_tpot = _round(cost.decode_step_seconds(1, 1500) * rng.uniform(2.5, 4.0))
    slo_ttft = _round(max(0.3, cost.prefill_seconds(4000) * rng.uniform(3.0, 6.0)))
    mixes = _phase_mixes(rng, int(rng.integers(3, 6)))
    lengths = _durations(rng, len(mixes))
    rates = [tuple(share * capacity_rps(cost, workers, mix, slo_ttft, slo_tpot) * rng.uniform(0.55, 1.0)
                   for share in mix) for mix in mixes]
    knots, kinds = _knots(rng, rates, lengths)
    shifts = kinds.pop() if len(set(kinds)) == 1 else "mixed"
    bursts = tuple(_burst(rng) for _ in range(int(rng.integers(0, 3))))
    return Scenario(seed=seed, hardware=hardware, model=model, tensor_parallel=tp, workers=workers,
                    slo_ttft_s=slo_ttft, slo_tpot_s=slo_tpot, knots=tuple(knots), bursts=bursts, shifts=shifts)


@dataclass(frozen=True)
class ScenarioTraffic:
    """The requests of a scenario, at any multiple of its rate (a `bench.traffic` source)."""

    scenario: Scenario

    def at(self, factor: float) -> list[TraceEntry]:
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor: must be a finite number > 0, got {factor!r}")
        grid = np.arange(0.0, self.scenario.duration_s + GRID_S, GRID_S)  # [G]
        rates = self._rates(grid[:-1])  # [G - 1, 3]
        intensity = np.concatenate(([0.0], np.cumsum(rates.sum(axis=1) * GRID_S)))  # [G]: requests by time t
        streams = np.random.SeedSequence(self.scenario.seed).spawn(2 + 2 * len(MIX))
        expected = intensity[-1] * factor
        units = np.cumsum(np.random.default_rng(streams[0]).exponential(size=int(expected * 1.2 + 50)))
        units = units[units < expected]  # [N]: unit-rate events, the same prefix at any factor
        times = np.interp(units / factor, intensity, grid)  # [N]
        choice = np.random.default_rng(streams[1]).random(len(times))  # [N]
        at = np.minimum((times / GRID_S).astype(np.int64), len(rates) - 1)  # [N]: grid cell of each arrival
        cumulative = np.cumsum(rates[at] / rates[at].sum(axis=1, keepdims=True), axis=1)  # [N, 3]: mix there
        kind = np.minimum((choice[:, None] >= cumulative).sum(axis=1), len(MIX) - 1)  # [N]
        inputs = np.empty(len(times), dtype=np.int64)
        outputs = np.empty(len(times), dtype=np.int64)
        for i, name in enumerate(MIX):
            workload = WORKLOADS[name]
            drawn_in = workload.input.sample(np.random.default_rng(streams[2 + 2 * i]), len(times))
            drawn_out = workload.output.sample(np.random.default_rng(streams[3 + 2 * i]), len(times))
            inputs = np.where(kind == i, drawn_in, inputs)
            outputs = np.where(kind == i, drawn_out, outputs)
        return [TraceEntry(float(t), int(p), int(o)) for t, p, o in zip(times, inputs, outputs)]

    def describe(self) -> str:
        return f"scenario {self.scenario.seed}: {self.scenario.describe()}; the search scales the rate"

    def _rates(self, t: np.ndarray) -> np.ndarray:
        """Each workload's rate at times `t` ([T] -> [T, 3]), bursts included."""
        knots = self.scenario.knots
        xs = [k.t_s for k in knots]
        rates = np.stack([np.interp(t, xs, [k.rates[i] for k in knots]) for i in range(len(MIX))], axis=1)
        for burst in self.scenario.bursts:
            inside = (t >= burst.start_s) & (t < burst.start_s + burst.duration_s)  # [T]
            rates = np.where(inside[:, None], rates * burst.factor, rates)
        return rates


def _phase_mixes(rng: np.random.Generator, count: int) -> list[tuple[float, float, float]]:
    """`count` mixes, each one workload or a blend led by one, no two neighbours led by the same workload."""
    mixes: list[tuple[float, float, float]] = []
    lead = -1
    for _ in range(count):
        lead = int(rng.choice([i for i in range(len(MIX)) if i != lead]))
        if rng.random() < 0.5:
            shares = np.zeros(len(MIX))
            shares[lead] = 1.0
        else:
            weights = np.full(len(MIX), 0.6)
            weights[lead] = 4.0
            shares = rng.dirichlet(weights)
        mixes.append(tuple(float(s) for s in shares))
    return mixes


def _durations(rng: np.random.Generator, count: int) -> list[float]:
    """Phase lengths summing to DURATION_S, none under 80 s."""
    spare = DURATION_S - 80.0 * count
    return [80.0 + spare * float(w) for w in rng.dirichlet(np.full(count, 2.0))]


def _knots(rng: np.random.Generator, rates: Sequence[tuple[float, ...]],
           lengths: Sequence[float]) -> tuple[list[Knot], list[str]]:
    """The profile: each phase flat, each change sudden or a ramp (a cross-fade) into the next phase."""
    knots = [Knot(0.0, rates[0])]
    kinds: list[str] = []
    start = 0.0
    for i in range(1, len(rates)):
        start += lengths[i - 1]
        if rng.random() < 0.5:
            kinds.append("sudden")
            knots += [Knot(start - 1e-6, rates[i - 1]), Knot(start, rates[i])]
        else:
            kinds.append("slow")
            ramp = min(float(rng.uniform(40.0, 150.0)), lengths[i] * 0.8)
            knots += [Knot(start, rates[i - 1]), Knot(start + ramp, rates[i])]
    knots.append(Knot(DURATION_S, rates[-1]))
    return knots, kinds


def _burst(rng: np.random.Generator) -> Burst:
    return Burst(start_s=float(rng.uniform(60.0, DURATION_S - 60.0)), duration_s=float(rng.uniform(10.0, 30.0)),
                 factor=float(rng.uniform(1.5, 2.5)))


def _phase_knots(knots: Sequence[Knot]) -> list[Knot]:
    """One knot per phase (where a phase's flat part starts)."""
    seen: list[Knot] = []
    for knot in knots:
        if not seen or knot.shares != seen[-1].shares:
            seen.append(knot)
    return seen


def _mix_name(shares: Sequence[float]) -> str:
    short = {"chat": "chat", "summarization": "docs", "code": "code"}
    lead = int(np.argmax(shares))
    if shares[lead] > 0.999:
        return short[MIX[lead]]
    return "+".join(f"{short[n]}{s:.0%}" for n, s in zip(MIX, shares) if s >= 0.1)


def _round(value: float) -> float:
    """Two significant digits: SLOs a person would write down."""
    return float(f"{value:.2g}")
