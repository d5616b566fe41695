"""The controller against the best static split on a family of generated scenarios (`bench.scenarios`).

For each scenario: the goodput (the highest rate multiple at which >= 90% of requests meet both SLOs) of the best
static P:D split, and of the ratio controller starting from the even split, both simulated by the fast planner
(`bench.fast_simulator`) on the same requests at each rate. The ratio controller / best static is what the
controller is for; `pdserve plan` does the same for one scenario with every split shown.

Finding the best static split of N workers by searching all N - 1 would cost most of the time, so it is found in two
stages: the even split's goodput first, then every split's attainment at 1.1x that rate (just past the even split's
knee, where the splits differ most; 1.3x busier again while more than three splits still pass there), and a full
search of the three best at that probe (the even split's search is kept too). The
static results do not depend on the controller, so they are kept in `static.json` in the output folder and reused by
runs that change only the controller's settings (`--set name=value`).

    python -m pdserve.bench.scenario_study --seeds 0-19 --out DIR [--set cooldown_s=10 ...] [--processes 2]

Goodputs are multiples of the scenario's drawn rate; the search brackets the goodput by factors of 1.5 and bisects
to 2% of it, then interpolates to 90%, so a ratio is good to about +-2%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from pdserve.bench.metrics import SLO, attainment, goodput_estimate
from pdserve.bench.planner import TARGET_ATTAINMENT, Candidate, PlanSetup, simulate
from pdserve.bench.plots import plot_scenario_study
from pdserve.bench.scenarios import KV_FRACTION, Scenario, ScenarioTraffic, cost_model, generate, switching_headroom
from pdserve.controller.config import ControllerConfig
from pdserve.controller.decision import Action
from pdserve.engine.config import EngineConfig, SimSettings

STUDY_VERSION = 2
"""Bumped when `bench.scenarios` draws differently or the simulated setup changes, so that cached static results are
not reused across versions."""
MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 8192
"""The engines' batch limits, as `pdserve plan`'s defaults (the controller is told the same max_num_seqs)."""
FIRST_FACTOR = 0.5
STEP = 1.5
RESOLUTION = 0.02
MAX_RUNS = 12
SEARCHED = 3
"""Static splits searched in full: the best ones at the probe rate."""
PROBE_STEP = 1.3
PROBE_ROUNDS = 5
"""When more than SEARCHED splits pass at the probe rate (ties: the even split was far from the best), the probe
is made PROBE_STEP times busier, up to PROBE_ROUNDS probes."""
ROLE_SWITCH_S = 5.0
WINDOW_S = 30.0


@dataclass(frozen=True)
class Goodput:
    factor: float
    """Interpolated rate multiple at 90% attainment (0: missed even at the lowest rate tried)."""
    points: tuple[tuple[float, float], ...]
    moves: int = 0
    """Controller moves at the highest passing rate."""


def plan_setup(scenario: Scenario, settings: Mapping[str, Any], hand_on_after_s: float | None = None) -> PlanSetup:
    """The planner's setup for a scenario, with the controller's defaults changed by `settings` (and leaving decode
    workers handing their requests on after `hand_on_after_s`, the live `controller.hand_on_after_s`)."""
    engine = EngineConfig(backend="sim", model=scenario.model, prefix_caching=False, max_num_seqs=MAX_NUM_SEQS,
                          max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                          sim=SimSettings(hardware=scenario.hardware, tensor_parallel=scenario.tensor_parallel))
    controller = ControllerConfig(slo_ttft_s=scenario.slo_ttft_s, slo_tpot_s=scenario.slo_tpot_s,
                                  kv_capacity_tokens=cost_model(scenario).kv_capacity_tokens(KV_FRACTION),
                                  max_num_seqs=MAX_NUM_SEQS, **settings)
    return PlanSetup(engine=engine, workers=scenario.workers, slo=SLO(scenario.slo_ttft_s, scenario.slo_tpot_s),
                     controller=controller, role_switch_s=ROLE_SWITCH_S, window_s=WINDOW_S, routing="load",
                     hand_on_after_s=hand_on_after_s, fast=True)


def search(run: Callable[[float], tuple[float, int]]) -> Goodput:
    """Bracket the 90% crossing by factors of STEP from FIRST_FACTOR, then bisect it to RESOLUTION."""
    points: list[tuple[float, float]] = []
    moves: dict[float, int] = {}

    def passes(factor: float) -> bool:
        value, moved = run(factor)
        points.append((factor, value))
        moves[factor] = moved
        return value >= TARGET_ATTAINMENT

    low, high = FIRST_FACTOR, FIRST_FACTOR
    if passes(FIRST_FACTOR):
        while len(points) < MAX_RUNS and passes(high := high * STEP):
            low = high
    else:
        while len(points) < MAX_RUNS and not passes(low := low / STEP):
            high = low
    while len(points) < MAX_RUNS and high - low > RESOLUTION * low:
        middle = (low + high) / 2
        if passes(middle):
            low = middle
        else:
            high = middle
    estimate = goodput_estimate(points, TARGET_ATTAINMENT)
    return Goodput(estimate.interpolated, tuple(points), moves.get(estimate.rate, 0))


def candidate_goodput(scenario: Scenario, candidate: Candidate, settings: Mapping[str, Any],
                      hand_on_after_s: float | None = None) -> Goodput:
    setup = plan_setup(scenario, settings, hand_on_after_s)
    traffic = ScenarioTraffic(scenario)

    def run(factor: float) -> tuple[float, int]:
        result = simulate(setup, candidate, traffic.at(factor))
        return (attainment(result.records, setup.slo),
                sum(1 for d in result.decisions if d.action is Action.MOVE))

    return search(run)


def static_best(seed: int) -> dict:
    """The best static split of a scenario (two stages, see the module's docstring)."""
    scenario = generate(seed)
    setup = plan_setup(scenario, {})
    traffic = ScenarioTraffic(scenario)
    n = scenario.workers
    even = Candidate(n // 2, n - n // 2, False)
    found = {even.prefill: candidate_goodput(scenario, even, {})}
    factor = max(found[even.prefill].factor, 0.05) * 1.1
    for _ in range(PROBE_ROUNDS):
        probe = traffic.at(factor)
        scores = {p: attainment(simulate(setup, Candidate(p, n - p, False), probe).records, setup.slo)
                  for p in range(1, n)}
        if sum(1 for value in scores.values() if value >= TARGET_ATTAINMENT) <= SEARCHED:
            break
        factor *= PROBE_STEP  # too many splits pass: the even split is far from the best, probe busier
    for p in sorted(scores, key=lambda p: -scores[p])[:SEARCHED]:
        if p not in found:
            found[p] = candidate_goodput(scenario, Candidate(p, n - p, False), {})
    best = max(found, key=lambda p: found[p].factor)
    return {"seed": seed, "best": f"{best}:{n - best}", "goodput": found[best].factor,
            "searched": {f"{p}:{n - p}": found[p].factor for p in sorted(found)},
            "probe_factor": factor, "probe": {f"{p}:{n - p}": scores[p] for p in sorted(scores)}}


def controller_goodput(seed: int, settings: Mapping[str, Any], start: tuple[int, int] | None = None,
                       hand_on_after_s: float | None = None) -> dict:
    """The controller's goodput from `start` (None: the even split)."""
    scenario = generate(seed)
    n = scenario.workers
    prefill, decode = start or (n // 2, n - n // 2)
    result = candidate_goodput(scenario, Candidate(prefill, decode, True), settings, hand_on_after_s)
    return {"seed": seed, "goodput": result.factor, "moves": result.moves, "points": result.points}


def run_study(seeds: Sequence[int], settings: Mapping[str, Any], out: str, processes: int,
              hand_on_after_s: float | None = None) -> list[dict]:
    """Each seed's best static split (cached in `out`/static.json), and the controller's goodput from the even split
    and from that best split (`hand_on_after_s`: for the controller's moves); one row per seed."""
    os.makedirs(out, exist_ok=True)
    cache_path = os.path.join(out, "static.json")
    cache = _read_cache(cache_path)
    started = time.monotonic()
    results: dict[tuple[str, int], dict] = {}
    with ProcessPoolExecutor(processes) as pool:
        jobs = {pool.submit(static_best, s): ("static", s) for s in seeds if str(s) not in cache}
        jobs.update({pool.submit(controller_goodput, s, settings, None, hand_on_after_s): ("even", s) for s in seeds})
        jobs.update({pool.submit(controller_goodput, s, settings, _split(cache[str(s)]["best"]), hand_on_after_s):
                     ("best", s) for s in seeds if str(s) in cache})
        total, done = 3 * len(seeds) - sum(1 for s in seeds if str(s) in cache), 0
        while jobs:
            finished, _ = wait(jobs, return_when=FIRST_COMPLETED)
            for future in finished:
                kind, seed = jobs.pop(future)
                done += 1
                if kind == "static":
                    cache[str(seed)] = future.result()
                    _write_json(cache_path, {"version": STUDY_VERSION, "static": cache})
                    best = _split(cache[str(seed)]["best"])
                    jobs[pool.submit(controller_goodput, seed, settings, best, hand_on_after_s)] = ("best", seed)
                else:
                    results[kind, seed] = future.result()
            print(f"\r{done}/{total} jobs done, {time.monotonic() - started:.0f} s", end="", file=sys.stderr)
    print(file=sys.stderr)
    rows = [_row(generate(s), cache[str(s)], results["even", s], results["best", s]) for s in seeds]
    _write_json(os.path.join(out, "study.json"), {"settings": dict(settings), "hand_on_after_s": hand_on_after_s,
                                                   "rows": rows,
                                                   "wall_s": time.monotonic() - started})
    return rows


def summary(rows: Sequence[dict], key: str = "ratio") -> dict:
    """The distribution of one ratio column ("ratio": from the even split; "ratio_from_best")."""
    ratios = [r[key] for r in rows]
    return {"scenarios": len(ratios), "median": statistics.median(ratios), "min": min(ratios),
            "below_0.95": sum(1 for x in ratios if x < 0.95), "geomean": math.exp(statistics.fmean(
                math.log(max(x, 1e-3)) for x in ratios))}


def print_table(rows: Sequence[dict]) -> None:
    print("| seed | scenario | SLO TTFT / TPOT | headroom | best static | its goodput (x) | controller from even (x) | "
          "ratio | moves | controller from best (x) | ratio | moves |")
    print("|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['scenario']} | {r['slo_ttft_s']:g} s / {r['slo_tpot_s'] * 1000:g} ms | "
              f"{r['headroom']:.2f} | {r['best_static']} | {r['static_goodput']:.3f} | {r['controller_goodput']:.3f} | "
              f"{r['ratio']:.2f} | {r['moves']} | {r['controller_from_best_goodput']:.3f} | "
              f"{r['ratio_from_best']:.2f} | {r['moves_from_best']} |")
    print()
    for key, name in (("ratio", "from the even split"), ("ratio_from_best", "from the best static split")):
        s = summary(rows, key)
        print(f"controller {name} / best static, {s['scenarios']} scenarios: median {s['median']:.3f}, geomean "
              f"{s['geomean']:.3f}, min {s['min']:.3f}, {s['below_0.95']} below 0.95")
    ceiling = statistics.median(r["headroom"] for r in rows)
    print(f"the model's ceiling for any controller (each phase on its own best split, switched at no cost): median "
          f"{ceiling:.3f}")


def _row(scenario: Scenario, static: dict, even: dict, best: dict) -> dict:
    def ratio(goodput: float) -> float:
        return goodput / static["goodput"] if static["goodput"] > 0 else math.nan

    return {"seed": scenario.seed, "scenario": scenario.describe(), "slo_ttft_s": scenario.slo_ttft_s,
            "slo_tpot_s": scenario.slo_tpot_s, "workers": scenario.workers, "headroom": switching_headroom(scenario),
            "best_static": static["best"],
            "static_goodput": static["goodput"], "controller_goodput": even["goodput"], "ratio": ratio(even["goodput"]),
            "moves": even["moves"], "controller_from_best_goodput": best["goodput"],
            "ratio_from_best": ratio(best["goodput"]), "moves_from_best": best["moves"]}


def _split(name: str) -> tuple[int, int]:
    prefill, _, decode = name.partition(":")
    return int(prefill), int(decode)


def _read_cache(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    return data["static"] if data.get("version") == STUDY_VERSION else {}


def _write_json(path: str, value: object) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def parse_seeds(text: str) -> list[int]:
    """"0-19,100,105-107" -> [0, ..., 19, 100, 105, 106, 107]."""
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        if not (first.isdigit() and (last.isdigit() or not last)):
            raise ValueError(f"--scenarios: {part!r} is not a seed or a range of seeds (e.g. 0-19,100)")
        seeds += range(int(first), int(last or first) + 1)
    return seeds


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """["cooldown_s=10", "shift_ratio=inf"] -> {"cooldown_s": 10.0, "shift_ratio": inf}; ints stay ints."""
    settings: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(ControllerConfig)} - {"slo_ttft_s", "slo_tpot_s"}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--set: {pair!r} is not name=value")
        if name not in names:
            raise ValueError(f"--set: {name!r} is not a controller setting (one of {', '.join(sorted(names))})")
        try:
            settings[name] = int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            raise ValueError(f"--set: {name}: {text!r} is not a number") from None
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-19", help="scenario seeds, e.g. 0-19,100-119 (default 0-19)")
    parser.add_argument("--out", required=True, metavar="DIR", help="static.json (cache) and study.json go here")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a controller setting (ControllerConfig field) other than its default; repeatable")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    try:
        seeds, settings = check_arguments(args.seeds, args.set)
    except ValueError as e:
        parser.error(str(e))
    rows = run_study(seeds, settings, args.out, args.processes)
    show(rows, args.out, args.seeds, args.json)
    return 0


def check_arguments(seeds_text: str, pairs: Sequence[str]) -> tuple[list[int], dict[str, Any]]:
    """The seeds and the controller settings, checked (ValueError naming what is wrong)."""
    seeds, settings = parse_seeds(seeds_text), parse_settings(pairs)
    ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05, **settings)  # a bad value fails here, naming it
    return seeds, settings


def show(rows: Sequence[dict], out: str, seeds_text: str, as_json: bool) -> None:
    """The plot into `out`/scenarios.png, and the table (or JSON) on stdout."""
    plot_scenario_study(rows, os.path.join(out, "scenarios.png"), f"{len(rows)} scenarios ({seeds_text})")
    if as_json:
        print(json.dumps({"rows": rows, "summary": summary(rows),
                          "summary_from_best": summary(rows, "ratio_from_best")}, indent=1))
    else:
        print_table(rows)


if __name__ == "__main__":
    sys.exit(main())
