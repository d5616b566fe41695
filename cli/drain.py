"""`pdserve drain WORKER [--replace]`: stop sending WORKER requests, let its running ones finish, then stop it
(for maintenance, or a worker that misbehaves). With --replace a fresh worker takes its place (same role and
cores). Draining the last worker of a role needs --replace. Exit code 2 when refused (no such worker, the last of
its role), 1 when no cluster answers."""

from __future__ import annotations

import argparse
import json

from pdserve.cli.router_call import Failed, call_router

DRAIN_TIMEOUT_S = 900


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("drain", help="drain and stop a worker", description=__doc__)
    p.add_argument("worker", metavar="WORKER", help="the worker id, as `pdserve status` shows it (e.g. decode-0)")
    p.add_argument("--replace", action="store_true", help="start a fresh worker in its place")
    p.add_argument("--router", metavar="HOST:PORT", help="the router (default: the cluster `pdserve up` started)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    done = call_router("pdserve drain", args.router,
                       lambda client: client.drain(args.worker, args.replace, timeout_s=DRAIN_TIMEOUT_S),
                       timeout_s=DRAIN_TIMEOUT_S)
    if isinstance(done, Failed):
        return done.exit_code
    if args.json:
        print(json.dumps({"stopped": done.stopped, "started": done.started or None}))
    else:
        print(f"drained and stopped {done.stopped}" + (f"; {done.started} took its place" if done.started else ""))
    return 0
