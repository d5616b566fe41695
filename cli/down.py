"""`pdserve down`: stop the cluster `pdserve up` started (router, workers, Ray, and its own redis-server)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from pdserve.cli.cluster_state import pid_alive, state_path
from pdserve.cluster.state import ClusterState

STOP_TIMEOUT_S = 60


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("down", help="stop the cluster", description=__doc__)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = state_path()
    if not os.path.exists(path):
        print("pdserve down: no cluster is up", file=sys.stderr)
        return 0
    state = ClusterState.read(path)
    _stop(state.pid, "cluster")
    if state.redis_pid is not None:
        _stop(state.redis_pid, "redis-server")  # already gone after a clean stop
    if os.path.exists(path):
        os.remove(path)
    print("pdserve: cluster stopped")
    return 0


def _stop(pid: int, what: str) -> None:
    if not pid_alive(pid):
        return
    os.kill(pid, signal.SIGINT)  # SIGTERM works too, but Ray logs a crash trace for it
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        print(f"pdserve down: the {what} (pid {pid}) did not stop in {STOP_TIMEOUT_S} s; killing it", file=sys.stderr)
        os.kill(pid, signal.SIGKILL)
