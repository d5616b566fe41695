"""`pdserve status [--json] [--router HOST:PORT]`: the router and every worker (id, role, pid, state, running
requests, KV blocks used/total). Exit code 1 when no cluster is up or the router does not answer."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import grpc

from pdserve.cli.cluster_state import NoCluster, router_address, router_client


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("status", help="show the cluster", description=__doc__)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--router", metavar="HOST:PORT", help="the router (default: the cluster `pdserve up` started)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    async def ask():
        async with router_client(args.router, timeout_s=10) as client:
            return await client.status(), await client.health()

    try:
        address = router_address(args.router)
        status, health = asyncio.run(ask())
    except NoCluster as e:
        print(f"pdserve status: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"pdserve status: the router at {address} does not answer: {e.code().name}", file=sys.stderr)
        return 1
    workers = [{"worker_id": w.worker_id, "role": w.role, "pid": w.pid, "state": w.state,
                "running_requests": w.running_requests, "kv_blocks_used": w.kv_blocks_used,
                "kv_blocks_total": w.kv_blocks_total} for w in status.workers]
    decisions = [] if args.router else _decisions()
    if args.json:
        print(json.dumps({"router": {"address": status.router_address, "mode": status.mode,
                                     "healthy": health.healthy, "detail": health.detail}, "workers": workers,
                          "controller": decisions}))
        return 0
    print(f"router  {status.router_address}  {status.mode}  {'healthy' if health.healthy else 'UNHEALTHY'}"
          f" ({health.detail})")
    header = f"{'worker':<14}{'role':<9}{'pid':>8}  {'state':<9}{'running':>8}  {'kv blocks':>13}"
    print(header)
    for w in workers:
        blocks = f"{w['kv_blocks_used']}/{w['kv_blocks_total']}"
        print(f"{w['worker_id']:<14}{w['role']:<9}{w['pid']:>8}  {w['state']:<9}{w['running_requests']:>8}  "
              f"{blocks:>13}")
    for d in decisions:
        print(f"controller t={d['now_s']:.0f}s {d['action']}{' (dry run)' if d['dry_run'] else ''}: {d['reason']}")
    return 0


def _decisions(count: int = 3) -> list[dict]:
    """The ratio controller's last decisions, from the cluster's Redis (none when it is not enabled)."""
    import redis

    from pdserve.cli.cluster_state import read_state
    from pdserve.cluster.registry import Registry

    try:
        entries = Registry(read_state().redis_url).read_decisions(count)
    except (NoCluster, redis.RedisError):
        return []
    return [{**{k: v for k, v in json.loads(text).items() if k in ("now_s", "action", "target", "reason")},
             "dry_run": dry} for text, dry in entries]
