"""`pdserve up [--config FILE] [--detach]`: start a cluster (redis, Ray, workers, routers) and print its address.

In the foreground it serves until Ctrl-C and then stops everything it started. With --detach it starts the control
plane in the background, returns once the router reports healthy, and `pdserve down` stops it all. If a cluster's
control plane was killed while its workers and routers serve on, `pdserve up` starts a control plane again, which
adopts them (no worker restarts); its log goes on in the same file.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import time

import grpc

from pdserve.cli.cluster_state import log_path, pid_alive, state_path
from pdserve.config import load_config
from pdserve.control_plane import local_redis, ray_head, router_pool
from pdserve.control_plane.processes import alive
from pdserve.control_plane.state_file import ClusterState
from pdserve.engine.config import ConfigError

HEALTHY_TIMEOUT_S = 900
HEALTHY_POLL_S = 0.2


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("up", help="start a cluster", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="cluster YAML (default: deploy/configs/local.yaml)")
    p.add_argument("--detach", action="store_true", help="run in the background; return once healthy")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="join this Ray cluster (`auto`: the one `ray start` runs here) instead of starting one; "
                        "overrides the config's ray_address")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        if args.ray_address:
            config = dataclasses.replace(config, ray_address=args.ray_address)
    except (ConfigError, OSError) as e:
        print(f"pdserve up: {e}", file=sys.stderr)
        return 2
    path = state_path()
    if os.path.exists(path):
        state = ClusterState.read(path)
        if pid_alive(state.pid):
            print(f"pdserve up: a cluster is already up (router {state.router_address}, pid {state.pid}); "
                  "`pdserve down` first", file=sys.stderr)
            return 1
        if _leftovers(state):
            print(f"pdserve: the control plane of the cluster at {state.router_address} is gone but its cluster "
                  "runs; starting a control plane that adopts it", file=sys.stderr)
    if not args.detach:
        from pdserve.control_plane.main import run as serve

        print("pdserve: starting (Ctrl-C stops the cluster)", file=sys.stderr, flush=True)
        return serve(config, path)
    return _detach(args.config, args.ray_address, path)


def _leftovers(state: ClusterState) -> bool:
    """Something the cluster started still runs (its Redis, Ray head or a router)."""
    return (alive(state.redis_pid, local_redis.MARK) or alive(state.ray_head_pid, ray_head.MARK)
            or any(alive(p, router_pool.MARK) for p in state.router_pids))


def _detach(config: str | None, ray_address: str | None, path: str) -> int:
    log = log_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    command = [sys.executable, "-m", "pdserve.control_plane.main", "--state", path]
    if config:
        command += ["--config", os.path.abspath(config)]
    if ray_address:
        command += ["--ray-address", ray_address]
    with open(log, "a") as out:  # a cluster's earlier log (a crash's record) is kept
        out.write(f"==== pdserve up at {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(f"pdserve up: the cluster exited with code {process.returncode}; last lines of {log}:\n"
                  + _tail(log), file=sys.stderr)
            return 1
        if os.path.exists(path) and _healthy(path, process.pid):
            state = ClusterState.read(path)
            http = f"; OpenAI API at http://{state.http_address}/v1" if state.http_address else ""
            print(f"pdserve: router at {state.router_address} ({state.mode}){http}; pid {state.pid}; logs {log}")
            return 0
        time.sleep(HEALTHY_POLL_S)
    print(f"pdserve up: not healthy after {HEALTHY_TIMEOUT_S} s; see {log}", file=sys.stderr)
    return 1


def _healthy(path: str, pid: int) -> bool:
    """The state file is this control plane's, and its router says it can serve."""
    state = ClusterState.read(path)
    if state.pid != pid:
        return False  # the state a killed control plane left, not rewritten yet

    async def check() -> bool:
        async with state.client(timeout_s=5) as client:
            return (await client.health()).healthy

    try:
        return asyncio.run(check())
    except (grpc.RpcError, OSError, ValueError):  # not up yet: ask again
        return False


def _tail(path: str, lines: int = 30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])
