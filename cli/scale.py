"""`pdserve scale --prefill N --decode M` (or `--colocated K`): start or stop workers until each pool named has that
many. A worker stopped is drained first (no new requests; its running ones finish), so no request is lost. Returns
once the new workers serve and the old ones have stopped. Exit code 2 when the cluster cannot take the change (it
would leave a role without a worker, or Ray has no room for the new ones), 1 when no cluster answers."""

from __future__ import annotations

import argparse
import json
import sys

from pdserve.cli.router_call import Failed, call_router

SCALE_TIMEOUT_S = 900


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("scale", help="set how many workers each pool has", description=__doc__)
    for name in ("prefill", "decode", "colocated"):
        p.add_argument(f"--{name}", type=int, metavar="N", help=f"{name} workers wanted")
    p.add_argument("--router", metavar="HOST:PORT", help="the router (default: the cluster `pdserve up` started)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    wanted = {name: getattr(args, name) for name in ("prefill", "decode", "colocated")
              if getattr(args, name) is not None}
    if not wanted:
        print("pdserve scale: give --prefill, --decode or --colocated", file=sys.stderr)
        return 2
    done = call_router("pdserve scale", args.router, lambda client: client.scale(**wanted,
                                                                                   timeout_s=SCALE_TIMEOUT_S),
                       timeout_s=SCALE_TIMEOUT_S)
    if isinstance(done, Failed):
        return done.exit_code
    if args.json:
        print(json.dumps({"started": list(done.started), "stopped": list(done.stopped)}))
    else:
        print(f"started: {', '.join(done.started) or 'none'}; stopped: {', '.join(done.stopped) or 'none'}")
    return 0
