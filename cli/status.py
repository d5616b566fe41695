"""`pdserve status [--json] [--router HOST:PORT]`: the cluster at a glance.

The router that answers (gRPC and HTTP addresses, mode, health), every router of the cluster (requests in flight
and waiting at each) and whether the control plane runs, the last minute's p90 TTFT and TPOT against the SLOs, every
worker (role, state, running and waiting requests, KV blocks used, its own p90 TTFT or TPOT, its prefix-cache hit
rate), and the ratio controller's last decisions. Exit code 0 when the cluster serves, 3 when it is up but cannot
serve (the reason is shown), 1 when no cluster is up or the router does not answer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pdserve.cli.router_call import Failed, call_router
from pdserve.proto import generation_pb2 as pb

EXIT_UNHEALTHY = 3
DECISIONS_SHOWN = 3
PLAIN_WIDTH = 132
ROLE_ORDER = {"prefill": 0, "decode": 1, "both": 2}


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("status", help="show the cluster", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--router", metavar="HOST:PORT", help="the router (default: the cluster `pdserve up` started)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    answer = call_router("pdserve status", args.router, lambda client: (client.status(), client.health()))
    if isinstance(answer, Failed):
        return answer.exit_code
    status, health = answer
    decisions = [] if args.router else _decisions(DECISIONS_SHOWN)
    if args.json:
        print(json.dumps(as_json(status, health, decisions)))
    else:
        width = None if sys.stdout.isatty() else PLAIN_WIDTH  # piped: wide enough for the whole table
        console = Console(highlight=False, width=width)
        for part in render(status, health, decisions):
            console.print(part)
    return 0 if health.healthy else EXIT_UNHEALTHY


def as_json(status: pb.StatusResponse, health: pb.HealthResponse, decisions: list[dict]) -> dict:
    latency = status.latency
    return {
        "router": {"router_id": status.router_id, "address": status.router_address,
                   "http_address": status.http_address or None, "mode": status.mode, "healthy": health.healthy,
                   "detail": health.detail},
        "routers": [{"router_id": r.router_id, "address": r.address, "http_address": r.http_address or None,
                     "pid": r.pid, "requests_in_flight": r.requests_in_flight, "requests_waiting": r.requests_waiting,
                     "started_at": r.started_at} for r in status.routers],
        "control_plane": {"address": status.control_address or None, "up": bool(status.control_address)},
        "requests": {"in_flight": status.requests_in_flight, "waiting": status.requests_waiting},
        "latency": {"window_s": latency.window_s, "finished": latency.finished,
                    "ttft_p90_s": _opt(latency, "ttft_p90_s"), "tpot_p90_s": _opt(latency, "tpot_p90_s"),
                    "slo_ttft_s": latency.slo_ttft_s, "slo_tpot_s": latency.slo_tpot_s,
                    "slo_met_fraction": latency.slo_met_fraction if latency.finished else None},
        "workers": [{"worker_id": w.worker_id, "role": w.role, "pid": w.pid, "state": w.state,
                     "running_requests": w.running_requests, "waiting_requests": w.waiting_requests,
                     "kv_blocks_used": w.kv_blocks_used, "kv_blocks_total": w.kv_blocks_total,
                     "finished_requests": w.finished_requests, "ttft_p90_s": _opt(w, "ttft_p90_s"),
                     "tpot_p90_s": _opt(w, "tpot_p90_s"), "prefix_cache_hit_rate": w.prefix_cache_hit_rate,
                     "speculative_acceptance_rate": w.speculative_acceptance_rate,
                     "speculative_tokens_per_step": w.speculative_tokens_per_step}
                    for w in status.workers],
        "controller": decisions,
    }


def render(status: pb.StatusResponse, health: pb.HealthResponse, decisions: list[dict]) -> list:
    """The status as rich renderables: a header, the workers' table, the controller's decisions."""
    latency = status.latency
    state = Text("serving", style="bold green") if health.healthy else Text(f"NOT SERVING: {health.detail}",
                                                                            style="bold red")
    http = f"  http://{status.http_address}/v1" if status.http_address else ""
    header = Text.assemble(("pdserve ", "bold"), f"{status.mode}  gRPC {status.router_address}{http}  ", state)
    requests = Text.assemble(f"requests: {status.requests_in_flight} in flight, {status.requests_waiting} waiting; "
                             f"last {latency.window_s:.0f} s: {latency.finished} finished")
    if latency.finished:
        ttft, tpot = _opt(latency, "ttft_p90_s"), _opt(latency, "tpot_p90_s")
        requests.append_text(Text.assemble(
            ", TTFT p90 ", _against(ttft, latency.slo_ttft_s), f" (SLO {_ms(latency.slo_ttft_s)})",
            ", TPOT p90 ", _against(tpot, latency.slo_tpot_s), f" (SLO {_ms(latency.slo_tpot_s)})",
            f", {latency.slo_met_fraction:.0%} within SLO"))
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name, justify in (("worker", "left"), ("role", "left"), ("state", "left"), ("pid", "right"),
                          ("running", "right"), ("waiting", "right"), ("KV blocks", "right"), ("KV use", "left"),
                          ("TTFT p90", "right"), ("TPOT p90", "right"), ("cache hits", "right"),
                          ("speculation", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for w in sorted(status.workers, key=lambda w: (ROLE_ORDER.get(w.role, 3), w.worker_id)):
        table.add_row(w.worker_id, w.role, Text(w.state, style="green" if w.state == "ready" else "yellow"),
                      str(w.pid), str(w.running_requests), str(w.waiting_requests),
                      f"{w.kv_blocks_used}/{w.kv_blocks_total}", _bar(w.kv_blocks_used, w.kv_blocks_total),
                      _against(_opt(w, "ttft_p90_s"), latency.slo_ttft_s),
                      _against(_opt(w, "tpot_p90_s"), latency.slo_tpot_s), f"{w.prefix_cache_hit_rate:.0%}",
                      _speculation(w))
    routers = Text.assemble("routers: ", ", ".join(f"{r.router_id} {r.address} ({r.requests_in_flight} in flight)"
                                                   for r in sorted(status.routers, key=lambda r: r.address))
                            or "none registered", "; control plane ",
                            ("up", "green") if status.control_address else ("down (serving goes on)", "bold red"))
    shown = [header, routers, requests, table]
    for d in decisions:
        shown.append(Text(f"controller t={d['now_s']:.0f}s {d['action']}{' (dry run)' if d['dry_run'] else ''}: "
                          f"{d['reason']}", style="dim"))
    return shown


def _opt(message, field: str) -> float | None:
    return getattr(message, field) if message.HasField(field) else None


def _against(value: float | None, slo: float) -> Text:
    """A latency coloured against its SLO: green within, red beyond; '-' when there is none."""
    if value is None or math.isnan(value):
        return Text("-", style="dim")
    return Text(_ms(value), style="green" if value <= slo else "bold red")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _speculation(w: pb.WorkerStatus) -> str:
    """"73% x3.1": the share of proposals accepted and the tokens a speculative step emits; "-" without speculation."""
    if not w.speculative_tokens_per_step:
        return "-"
    return f"{w.speculative_acceptance_rate:.0%} x{w.speculative_tokens_per_step:.1f}"


def _bar(used: int, total: int, width: int = 10) -> Text:
    share = used / total if total else 0.0
    filled = round(share * width)
    style = "green" if share < 0.7 else "yellow" if share < 0.9 else "red"
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"), f" {share:4.0%}")


def _decisions(count: int) -> list[dict]:
    """The ratio controller's last decisions, from the cluster's Redis (none when it is not enabled)."""
    import redis

    from pdserve.cli.cluster_state import NoCluster, read_state
    from pdserve.registry.registry import Registry

    try:
        entries = Registry(read_state().redis_url).read_decisions(count)
    except (NoCluster, redis.RedisError):
        return []
    return [{**{k: v for k, v in json.loads(text).items() if k in ("now_s", "action", "target", "reason")},
             "dry_run": dry} for text, dry in entries]
