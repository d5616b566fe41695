"""`pdserve router [--grpc-port N] [--http-port M] [--detach]`: start another router for the running cluster.

It serves the same workers as the cluster's other routers (active-active): each request runs through one router,
and a client given several routers (`pdserve generate --router A,B`, `Client("A,B")`) moves on to another when one
fails, its streams taken over where they were. It finds the cluster through `pdserve up`'s state file (or
--redis-url). In the foreground it serves until Ctrl-C; with --detach it runs in the background (its log beside the
cluster's) and returns once it serves. `pdserve status` lists it; `pdserve down` stops it with the cluster.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from pdserve.cli.cluster_state import NoCluster, log_path, read_state
from pdserve.control_plane.ray_head import auth_env

READY_TIMEOUT_S = 120


def register(commands: argparse._SubParsersAction) -> None:
    from pdserve.router.main import add_listen_args

    p = commands.add_parser("router", help="start another router for the running cluster", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_listen_args(p)
    p.add_argument("--redis-url", help="the cluster's registry (default: from `pdserve up`'s state file)")
    p.add_argument("--detach", action="store_true", help="run in the background; return once it serves")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pdserve.router.main import listen_of
    from pdserve.router.main import run as serve

    try:
        state = None if args.redis_url else read_state()
    except NoCluster as e:
        print(f"pdserve router: {e}", file=sys.stderr)
        return 1
    redis_url = args.redis_url or state.redis_url
    if state is not None and state.ray_token_file:  # the cluster's own Ray head asks for its token
        os.environ.update(auth_env(state.ray_token_file))
    if not args.detach:
        return serve(redis_url, listen_of(args))
    return _detach(redis_url, args)


def _detach(redis_url: str, args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "pdserve.router.main", "--redis-url", redis_url]
    for flag, value in (("--host", args.host), ("--port", args.port), ("--http-port", args.http_port),
                        ("--metrics-port", args.metrics_port)):
        if value is not None:
            command += [flag, str(value)]
    log = os.path.join(os.path.dirname(log_path()), f"router-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    with open(log, "a") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(f"pdserve router: it exited with code {process.returncode}; see {log}", file=sys.stderr)
            return 1
        router = _registered(redis_url, process.pid)
        if router is not None:
            http = f", OpenAI API at http://{router.http_address}/v1" if router.http_address else ""
            print(f"pdserve: router {router.router_id} at {router.address}{http}; pid {process.pid}; logs {log}")
            return 0
        time.sleep(0.5)
    print(f"pdserve router: not serving after {READY_TIMEOUT_S} s; see {log}", file=sys.stderr)
    return 1


def _registered(redis_url: str, pid: int):
    """The router's registry entry, once it serves (None before)."""
    import redis

    from pdserve.registry.registry import Registry

    try:
        return next((r for r in Registry(redis_url).routers() if r.pid == pid), None)
    except redis.RedisError:
        return None
