"""`pdserve plan`: offline capacity planning. For a trace and N simulated workers, every static prefill:decode split
and the ratio controller, each run through the real scheduler, routing and controller code on a virtual clock
(no Ray, no GPU): SLO attainment, goodput and latency percentiles.

    pdserve plan --trace FILE --workers 8 --hardware h100 --model llama-3-8b --slo-ttft 1 --slo-tpot 0.05 [--json]
    pdserve plan --workload shift --rate 20 --duration-s 600 --workers 8 ...     (a built-in trace instead of a file)
    pdserve plan --phases chat:200:10,summarization:200:2,chat:200:10 --workers 8 ...   (workload:seconds:rate, ...)
    pdserve plan ... --workers 12 --min-workers 4 --max-workers 12 --controller-from 2:2   (autoscaling from 4)
    pdserve plan ... --peak-fleet      (and the static fleet the peak needs, to judge the autoscaler's saving by)
    pdserve plan ... --policy pdserve.examples.queue_scaler:QueueScaler --policy-config '{"add_above": 4}'
    pdserve plan ... --set target_load=0.9 --set scale_down_load=0.8   (any controller setting, any run)
    pdserve plan --scenarios 0-19 --out DIR [--set cooldown_s=20 ...]   (the controller on generated scenarios)

Trace files are JSON lines {"arrival_s": float, "input_tokens": int, "output_tokens": int}, optionally with
"prefix_id" and "prefix_tokens": entries with one prefix_id share their first prefix_tokens prompt tokens (a system
prompt, a document, a conversation's earlier turns), which the simulated workers' prefix caches reuse and KV-aware
routing follows, as live. `--compare-caching` runs the best static split again without prefix caching, to show what
caching is worth for the trace; the "hit" column is the share of prompt tokens served from prefix caches.

`--scenarios SEEDS` runs `bench.scenario_study` instead: each seed a generated scenario (`bench.scenarios`: its own
hardware, model, worker count, SLOs and ten minutes of shifting traffic), the controller's goodput from the even
split and from the best static split against the best static split's, with the fast planner; `--set` changes a
controller setting for the run. The best static splits are cached in DIR/static.json.

The goodput search replays a trace file faster (its phases get shorter); built-in workloads and --phases keep each
phase's length and raise its rate, which is what a service whose mix shifts over minutes sees when it gets busier.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("plan", help="plan capacity offline: every P:D split and the controller, simulated",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", metavar="FILE", help="a JSON-lines trace")
    source.add_argument("--workload", choices=("chat", "summarization", "code", "shift", "daily"),
                        help="a built-in trace (daily: a day's swing, --rate at its peak, a third at its trough)")
    source.add_argument("--phases", metavar="SPEC", help="workload:duration_s:rate phases, comma-separated")
    source.add_argument("--scenarios", metavar="SEEDS",
                        help="generated scenarios by seed (e.g. 0-19,100): the controller against the best static "
                             "split on each (needs --out; the cluster and SLOs come from each scenario)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a controller setting (ControllerConfig field) other than its default; repeatable")
    p.add_argument("--rate", type=float, default=20.0, help="requests/s of the built-in trace (default 20)")
    p.add_argument("--duration-s", type=float, default=600.0, help="length of the built-in trace (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="workers in the cluster (P + D); required but with --scenarios")
    p.add_argument("--hardware", default="h100", help="h100, h200 or a100 (default h100)")
    p.add_argument("--model", default="llama-3-8b", help="a model shape: llama-3-8b, llama-3-70b, ...")
    p.add_argument("--tp", type=int, default=1, help="GPUs per worker (tensor parallelism)")
    p.add_argument("--link", choices=("nvlink", "network"), default="network", help="what KV handoffs cross")
    p.add_argument("--layerwise", action="store_true",
                   help="stream each layer's KV as the prefill's last step computes it, not after the step")
    p.add_argument("--slo-ttft", type=float, metavar="SECONDS", help="required but with --scenarios")
    p.add_argument("--slo-tpot", type=float, metavar="SECONDS", help="required but with --scenarios")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--interval-s", type=float, help="controller tick (default: the controller's own, as live)")
    p.add_argument("--cooldown-s", type=float,
                   help="controller cooldown after a move (default: the controller's own, as live)")
    p.add_argument("--window-s", type=float, default=30.0, help="controller traffic window (default 30)")
    p.add_argument("--max-moves", type=int,
                   help="most workers one controller decision moves (default: the controller's own, as live)")
    p.add_argument("--role-switch-s", type=float, default=5.0,
                   help="seconds from a moved worker's drain to serving in its new role (default 5; live ~2 for "
                        "a switch in place, a model load more for a restart)")
    p.add_argument("--hand-on-after-s", type=float, default=None, metavar="SECONDS",
                   help="a decode worker leaving its pool hands on what it still decodes this long into its drain "
                        "(controller.hand_on_after_s; default: waits for it to finish)")
    p.add_argument("--min-workers", type=int, default=None,
                   help="the controller may remove workers down to this many (default: it never removes)")
    p.add_argument("--max-workers", type=int, default=None,
                   help="the controller may add workers up to this many (default: it never adds)")
    p.add_argument("--scale-down-cooldown-s", type=float,
                   help="no remove within this long of the last change (default: the controller's own, as live)")
    p.add_argument("--worker-start-s", type=float, default=60.0,
                   help="seconds from an add to the new worker serving (default 60)")
    p.add_argument("--policy", default="", metavar="MODULE:CLASS",
                   help="the policy that ticks instead of the built-in ratio controller (controller.policy)")
    p.add_argument("--policy-config", default="{}", metavar="JSON", help="the policy's own settings, as JSON")
    p.add_argument("--splits", metavar="P:D,...", help="only these static splits (default: every P:D)")
    p.add_argument("--controller-from", metavar="P:D",
                   help="the controller's starting split (default: even; with a worker budget, any size within it)")
    p.add_argument("--prefix-caching", choices=("on", "off"), default="on",
                   help="engine.prefix_caching of the simulated workers (default on)")
    p.add_argument("--routing", choices=("load", "kv_aware"), default="kv_aware",
                   help="router.routing of the simulated router (default kv_aware)")
    p.add_argument("--compare-caching", action="store_true",
                   help="also run the best static split without prefix caching (and load routing)")
    p.add_argument("--no-search", action="store_true", help="skip the goodput search (one run per candidate)")
    p.add_argument("--fast", action="store_true",
                   help="a step-level model of the workers instead of the real engines (bench/fast_simulator.py: "
                        "tens of times faster; no prefix caching, hand-on or speculative decoding)")
    p.add_argument("--search", type=float, nargs=2, default=(0.5, 3.0), metavar=("LOW", "HIGH"),
                   help="goodput search range, as multiples of the trace's rate (default 0.5 3)")
    p.add_argument("--search-runs", type=int, default=6, help="simulations per candidate in the search (default 6)")
    p.add_argument("--peak-fleet", action="store_true",
                   help="also find the static fleet sized for the peak (the fewest workers, up to --workers, whose "
                        "best split holds 90%% attainment in every --peak-window-s window) and compare the "
                        "controller's worker-seconds with it (bench/fleet_sizing.py)")
    p.add_argument("--peak-window-s", type=float, default=60.0,
                   help="the window --peak-fleet judges attainment in (default 60 s)")
    p.add_argument("--processes", type=int, default=None, help="parallel simulations (default: CPU count)")
    p.add_argument("--out", metavar="DIR", help="write report.json and plots here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pdserve.bench.metrics import SLO
    from pdserve.bench.planner import PlanSetup, best_static, plan
    from pdserve.bench.scenario_study import parse_settings
    from pdserve.bench.workloads import TraceError, mean_rate
    from pdserve.controller.config import ControllerConfig, ControllerConfigError
    from pdserve.engine.config import ConfigError, EngineConfig, SimSettings
    from pdserve.engine.cost_model import CostModel, Link
    from pdserve.engine.hardware import hardware
    from pdserve.engine.shapes import shape

    if args.scenarios:
        return _run_scenarios(args)
    missing = [flag for flag, value in (("--workers", args.workers), ("--slo-ttft", args.slo_ttft),
                                        ("--slo-tpot", args.slo_tpot)) if value is None]
    if missing:
        print(f"pdserve plan: {', '.join(missing)} required (with --trace, --workload or --phases)", file=sys.stderr)
        return 2
    try:
        if args.workers < 2:
            raise ConfigError(f"--workers: need at least 2 (one prefill, one decode), got {args.workers}")
        _check_numbers(args)
        traffic = _traffic(args)
        trace = traffic.at(1.0)
        engine = EngineConfig(backend="sim", model=args.model, max_num_seqs=args.max_num_seqs,
                              sim=SimSettings(hardware=args.hardware, tensor_parallel=args.tp),
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              prefix_caching=args.prefix_caching == "on")
        cost = CostModel(shape(args.model), hardware(args.hardware), args.tp)
        slo = SLO(args.slo_ttft, args.slo_tpot)
        prefill_counts = _splits(args.splits, args.workers)
        flags = {"interval_s": args.interval_s, "cooldown_s": args.cooldown_s, "max_moves": args.max_moves,
                 "scale_down_cooldown_s": args.scale_down_cooldown_s}
        controller = ControllerConfig(slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot,
                                      max_num_seqs=args.max_num_seqs, min_workers=args.min_workers,
                                      max_workers=args.max_workers,
                                      kv_capacity_tokens=cost.kv_capacity_tokens(engine.sim.gpu_memory_fraction),
                                      **{name: value for name, value in flags.items() if value is not None}
                                      ).replace(**parse_settings(args.set))
        start = _start(args.controller_from, args.workers, controller)
        policy_config = _policy_config(args.policy_config)
        _check_policy(args.policy, controller, cost, policy_config)
    except (OSError, TraceError, ConfigError, ControllerConfigError, ValueError) as e:
        print(f"pdserve plan: {e}", file=sys.stderr)
        return 2
    if not trace:
        print("pdserve plan: the trace has no requests", file=sys.stderr)
        return 2
    setup = PlanSetup(engine=engine, workers=args.workers, slo=slo, controller=controller, link=Link(args.link),
                      layerwise=args.layerwise,
                      role_switch_s=args.role_switch_s, window_s=args.window_s, search=not args.no_search,
                      hand_on_after_s=args.hand_on_after_s, prefill_counts=prefill_counts,
                      controller_prefill=start[0] if start else None,
                      controller_decode=start[1] if start else None, policy=args.policy,
                      policy_config=policy_config, worker_start_s=args.worker_start_s,
                      search_low=args.search[0],
                      search_high=args.search[1], search_runs=args.search_runs, routing=args.routing,
                      fast=args.fast)
    if args.fast and (why_not := _fast_refusal(setup, trace)):
        print(f"pdserve plan --fast: {why_not}", file=sys.stderr)
        return 2
    started = time.monotonic()
    reports = plan(setup, traffic, args.processes, progress=_progress(started))
    if sys.stderr.isatty():
        print(file=sys.stderr)  # past the status line
    wall = time.monotonic() - started
    span = trace[-1].arrival_s - trace[0].arrival_s
    report = {"trace": {"requests": len(trace), "span_s": span, "rate": mean_rate(trace),
                        "traffic": traffic.describe()},
              "setup": {"workers": args.workers, "hardware": args.hardware, "model": args.model, "tp": args.tp,
                        "link": args.link, "layerwise": args.layerwise, "slo_ttft_s": args.slo_ttft,
                        "slo_tpot_s": args.slo_tpot},
              "wall_s": wall, "candidates": [r.to_dict() for r in reports],
              "best_static": best_static(reports).name}
    if args.compare_caching:
        report["without_caching"] = _without_caching(setup, reports, traffic).to_dict()
    if args.peak_fleet:
        report["peak_fleet"] = _peak_fleet(setup, trace, reports, args, _progress(started))
    if args.out:
        _write(args.out, report, reports, trace, args)
    if args.json:
        print(json.dumps({**report, "candidates": [{k: v for k, v in c.items() if k != "pool_samples"}
                                                   for c in report["candidates"]]}, indent=1))
    else:
        _print_table(reports, report, best_static(reports))
        if args.compare_caching:
            _print_without_caching(report["without_caching"], best_static(reports))
        if args.peak_fleet:
            _print_peak_fleet(report["peak_fleet"], reports, args.workers, args.peak_window_s)
    return 0


def _run_scenarios(args: argparse.Namespace) -> int:
    from pdserve.bench.scenario_study import check_arguments, run_study, show

    try:
        if not args.out:
            raise ValueError("--out: --scenarios needs a folder for its cache and results")
        seeds, settings = check_arguments(args.scenarios, args.set)
    except ValueError as e:  # ControllerConfigError included
        print(f"pdserve plan: {e}", file=sys.stderr)
        return 2
    rows = run_study(seeds, settings, args.out, args.processes or os.cpu_count() or 1, args.hand_on_after_s)
    show(rows, args.out, args.scenarios, args.json)
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    """Raises ValueError naming a flag whose number the simulation cannot run with (the controller's own settings
    are checked by its config)."""
    for flag, value, lowest, strict in (("--window-s", args.window_s, 0, True),
                                        ("--peak-window-s", args.peak_window_s, 0, True),
                                        ("--role-switch-s", args.role_switch_s, 0, False),
                                        ("--worker-start-s", args.worker_start_s, 0, False),
                                        ("--hand-on-after-s", args.hand_on_after_s, 0, False),
                                        ("--search-runs", args.search_runs, 2, False)):
        if value is not None and not (math.isfinite(value) and (value > lowest if strict else value >= lowest)):
            raise ValueError(f"{flag}: must be a finite number {'>' if strict else '>='} {lowest}, got {value}")
    low, high = args.search
    if not (0 < low < high and math.isfinite(high)):
        raise ValueError(f"--search: need 0 < LOW < HIGH, got {low:g} {high:g}")


def _fast_refusal(setup, trace) -> str:
    """Why the fast simulator cannot plan this ("" when it can)."""
    from pdserve.bench.fast_simulator import refuse_unmodelled
    from pdserve.bench.sim_setup import SimSetup

    try:
        refuse_unmodelled(SimSetup(setup.engine, 1, 1, setup.slo, hand_on_after_s=setup.hand_on_after_s), trace)
    except ValueError as e:
        return str(e)
    return ""


def _progress(started: float):
    """A status line on stderr, rewritten in place on a terminal."""
    def show(message: str) -> None:
        line = f"pdserve plan: {time.monotonic() - started:.0f} s, {message}"
        print(f"\r{line}\x1b[K" if sys.stderr.isatty() else line, end="" if sys.stderr.isatty() else "\n",
              file=sys.stderr, flush=True)
    return show


def _without_caching(setup, reports, traffic):
    """The best static split again, with prefix caching off and load-only routing."""
    import dataclasses

    from pdserve.bench.planner import Candidate, best_static, evaluate

    best = best_static(reports)
    plain = dataclasses.replace(setup, engine=dataclasses.replace(setup.engine, prefix_caching=False),
                                routing="load")
    return evaluate(plain, Candidate(best.prefill, best.decode, False), traffic)


def _peak_fleet(setup, trace, reports, args, progress) -> dict | None:
    from pdserve.bench.fleet_sizing import size_static_fleet
    from pdserve.bench.planner import best_static

    best = best_static(reports)
    fleet = size_static_fleet(setup, trace, args.workers, best.prefill / (best.prefill + best.decode),
                              args.peak_window_s, args.processes or os.cpu_count() or 1, progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)  # past the status line
    return None if fleet is None else {"prefill": fleet.prefill, "decode": fleet.decode, "workers": fleet.workers,
                                       "worst_window": fleet.worst_window, "attainment": fleet.attainment}


def _print_peak_fleet(fleet: dict | None, reports, workers: int, window_s: float) -> None:
    if fleet is None:
        print(f"static fleet for the peak: no split of {workers} workers holds 90% "
              f"attainment in every {window_s:g} s window")
        return
    print(f"static fleet for the peak: {fleet['workers']} workers ({fleet['prefill']}:{fleet['decode']}), the fewest "
          f"holding 90% attainment in every {window_s:g} s window (worst {fleet['worst_window']:.3f}, "
          f"{fleet['attainment']:.3f} overall)")
    for r in reports:
        if r.controlled:
            print(f"{r.name}: {r.mean_workers:.2f} workers on average, {r.mean_workers / fleet['workers']:.2f} of "
                  f"the peak fleet's worker-seconds, attainment {r.attainment:.3f}")


def _print_without_caching(without: dict, best) -> None:
    ratio = best.goodput_rps / without["goodput_rps"] if without["goodput_rps"] > 0 else math.nan
    print(f"{best.name} without prefix caching: attainment {without['attainment']:.3f}, goodput "
          f"{without['goodput_rps']:.2f} req/s, TTFT p50 {without['ttft_s']['p50']:.3f} s "
          f"(with caching: goodput x{ratio:.2f}, hit rate {best.cache_hit_rate:.3f})")


def _splits(text: str | None, workers: int) -> tuple[int, ...] | None:
    """The prefill counts of `--splits 3:5,4:4` (or `--controller-from`); each split must add up to --workers."""
    if text is None:
        return None
    counts = []
    for item in text.split(","):
        prefill, _, decode = item.partition(":")
        if not (prefill.strip().isdigit() and decode.strip().isdigit()) or int(prefill) + int(decode) != workers:
            raise ValueError(f"--splits/--controller-from: {item!r} is not P:D with P + D = --workers ({workers})")
        counts.append(int(prefill))
    return tuple(counts)


def _start(text: str | None, workers: int, controller) -> tuple[int, int] | None:
    """--controller-from P:D: P + D = --workers, or within the worker budget when one is set."""
    if text is None:
        return None
    low = controller.min_workers if controller.min_workers is not None else workers
    high = controller.max_workers if controller.max_workers is not None else workers
    prefill, _, decode = text.partition(":")
    if not (prefill.strip().isdigit() and decode.strip().isdigit()):
        raise ValueError(f"--controller-from: {text!r} is not P:D")
    start = int(prefill), int(decode)
    if not (min(low, workers) <= sum(start) <= max(high, workers)) or min(start) < 1:
        raise ValueError(f"--controller-from: {text!r} must have P, D >= 1 and P + D within the budget "
                         f"({min(low, workers)}..{max(high, workers)} workers)")
    return start


def _policy_config(text: str) -> dict:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--policy-config: not JSON: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--policy-config: must be a JSON object, got {text!r}")
    return values


def _check_policy(name: str, controller, cost, settings: dict) -> None:
    """Make the policy once here, so a bad name or setting is an error at once, not in every worker process."""
    from pdserve.controller.policy import PolicyContext, load_policy

    load_policy(name, PolicyContext(controller, cost), settings)


def _traffic(args: argparse.Namespace):
    """The traffic the flags name: a trace file, --phases, or a built-in workload as phases."""
    from pdserve.bench.traffic import traffic_of
    from pdserve.bench.workloads import WORKLOADS, Phase, daily_phases, parse_phases, read_trace, shift_phases

    if args.trace:
        return traffic_of(entries=read_trace(args.trace))
    if args.phases:
        return traffic_of(phases=parse_phases(args.phases), seed=args.seed)
    if args.workload == "shift":
        return traffic_of(phases=shift_phases(args.rate, args.duration_s), seed=args.seed)
    if args.workload == "daily":
        return traffic_of(phases=daily_phases(args.rate, args.duration_s), seed=args.seed)
    return traffic_of(phases=[Phase(WORKLOADS[args.workload], args.duration_s, args.rate)], seed=args.seed)


def _print_table(reports, report, best) -> None:
    t = report["trace"]
    print(f"trace: {t['requests']} requests over {t['span_s']:.0f} s ({t['rate']:.2f} req/s); "
          f"simulated in {report['wall_s']:.0f} s")
    print(f"traffic: {t['traffic']}")
    print(f"{'split':<24}{'attain':>8}{'goodput':>10}{'vs best':>9}{'TTFT p50':>10}{'p90':>8}{'p99':>8}"
          f"{'TPOT p50':>10}{'p90':>8}{'p99':>8}{'moves':>7}{'+/-':>7}{'workers':>8}{'hit':>7}")
    for r in reports:
        ratio = r.goodput_rps / best.goodput_rps if best.goodput_rps > 0 else math.nan
        print(f"{r.name:<24}{r.attainment:>8.3f}{r.goodput_rps:>10.2f}{ratio:>9.2f}"
              f"{r.ttft_s['p50']:>10.3f}{r.ttft_s['p90']:>8.3f}{r.ttft_s['p99']:>8.3f}"
              f"{r.tpot_s['p50'] * 1e3:>9.1f}m{r.tpot_s['p90'] * 1e3:>7.1f}m{r.tpot_s['p99'] * 1e3:>7.1f}m{r.moves:>7}"
              f"{f'+{r.adds}/-{r.removes}':>7}{r.mean_workers:>8.2f}{r.cache_hit_rate:>7.3f}")
    print(f"best static split: {best.name} (goodput {best.goodput_rps:.2f} req/s); TPOT in ms; workers: the mean "
          f"held over the run (serving, starting or draining)")


def _write(out: str, report: dict, reports, trace, args) -> None:
    from pdserve.bench.plots import plot_timeline

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "plan.json"), "w") as f:
        json.dump(report, f, indent=1)
    controlled = [r for r in reports if r.controlled]
    if controlled:
        samples = [(s.t, s.prefill, s.decode) for s in controlled[0].pool_samples]
        plot_timeline([e.arrival_s for e in trace], samples, controlled[0].attainment_series,
                      os.path.join(out, "plan_pools.png"), title="controller: pool sizes against the load")
