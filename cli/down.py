"""`pdserve down`: stop the cluster `pdserve up` started: its routers, workers, Ray head and redis-server.

Its control plane stops them all, in order. If the control plane was killed, this stops what it left running
itself: the routers (the ones `pdserve router` started too, told through the registry), the Ray head with every
process under it (the workers), and the redis-server. Nothing of the cluster is left running either way.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import redis

from pdserve.cli.cluster_state import pid_alive, state_path
from pdserve.control_plane import local_redis, ray_head, router_pool
from pdserve.control_plane.processes import end_tree
from pdserve.control_plane.state_file import ClusterState
from pdserve.registry.registry import Registry

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
    if pid_alive(state.pid):
        _stop(state.pid, "control plane")
    _ask_routers_to_stop(state.redis_url)
    for pid in state.router_pids:  # all gone after a clean stop; left running if the control plane was killed
        end_tree(pid, router_pool.MARK, grace_s=10, what="router")
    end_tree(state.ray_head_pid, ray_head.MARK, grace_s=5, what="Ray head")
    if state.ray_token_file and os.path.exists(state.ray_token_file):
        os.remove(state.ray_token_file)
    end_tree(state.redis_pid, local_redis.MARK, grace_s=10, what="redis-server")
    if os.path.exists(path):
        os.remove(path)
    print("pdserve: cluster stopped")
    return 0


def _stop(pid: int, what: str) -> None:
    os.kill(pid, signal.SIGINT)  # SIGTERM works too, but Ray logs a crash trace for it
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        print(f"pdserve down: the {what} (pid {pid}) did not stop in {STOP_TIMEOUT_S} s; killing it", file=sys.stderr)
        os.kill(pid, signal.SIGKILL)


def _ask_routers_to_stop(redis_url: str) -> None:
    """Routers this machine's state file does not list (`pdserve router`) stop on the registry's flag."""
    try:
        Registry(redis_url).request_stop()
    except redis.RedisError:  # Redis is gone: so is what would read the flag
        pass
