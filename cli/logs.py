"""`pdserve logs [-n N] [-f] [--worker ID]`: the cluster's log (control plane, routers, controller), or one worker's.

The cluster's log is the file `pdserve up --detach` writes next to its state file (a foreground `pdserve up` logs
to its terminal instead). A worker's output is in the Ray session's log folder on this machine, found by the
worker's pid (`pdserve status` lists them); on a multi-node Ray cluster run this on the worker's node, or use
`ray logs`. Exit code 1 when there is no such log.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from collections import deque

from pdserve.cli.cluster_state import NoCluster, log_path, read_state
from pdserve.cli.router_call import Failed, call_router

FOLLOW_POLL_S = 0.5


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("logs", help="show the cluster's or a worker's log", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--lines", type=int, default=50, help="last lines to show (default 50)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    p.add_argument("--worker", metavar="ID", help="a worker's output (e.g. decode-0) instead of the cluster's")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    paths = _worker_logs(args.worker) if args.worker else _cluster_log()
    if isinstance(paths, Failed):
        return paths.exit_code
    for path in paths:
        if len(paths) > 1:
            print(f"==> {path} <==")
        with open(path, errors="replace") as f:
            sys.stdout.writelines(deque(f, maxlen=max(0, args.lines)))
    if args.follow:
        return _follow(paths[-1])
    return 0


def _cluster_log() -> list[str] | Failed:
    path = log_path()
    if not os.path.exists(path):
        print(f"pdserve logs: no {path}: start the cluster with `pdserve up --detach` (a foreground `pdserve up` "
              "logs to its terminal)", file=sys.stderr)
        return Failed(1)
    return [path]


def _worker_logs(worker_id: str) -> list[str] | Failed:
    status = call_router("pdserve logs", None, lambda client: client.status())
    if isinstance(status, Failed):
        return status
    pids = {w.worker_id: w.pid for w in status.workers}
    if worker_id not in pids:
        print(f"pdserve logs: no worker {worker_id!r} (workers: {', '.join(sorted(pids)) or 'none'})", file=sys.stderr)
        return Failed(2)
    try:
        logs_dir = read_state().ray_logs_dir
    except NoCluster as e:
        print(f"pdserve logs: {e}", file=sys.stderr)
        return Failed(1)
    paths = sorted(glob.glob(os.path.join(logs_dir, f"worker-*-{pids[worker_id]}.*"))) if logs_dir else []
    if not paths:
        print(f"pdserve logs: no log of {worker_id} (pid {pids[worker_id]}) in {logs_dir or 'the Ray session'}; is "
              "it on another node? (`ray logs` there)", file=sys.stderr)
        return Failed(1)
    return paths


def _follow(path: str) -> int:
    with open(path, errors="replace") as f:
        f.seek(0, os.SEEK_END)
        try:
            while True:
                line = f.readline()
                if line:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                else:
                    time.sleep(FOLLOW_POLL_S)
        except KeyboardInterrupt:
            return 0
