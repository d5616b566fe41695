"""The control plane as a process of its own (what `pdserve up --detach` starts in the background):

    python -m pdserve.control_plane.main --state FILE [--config FILE] [--ray-address ADDRESS]

It serves until SIGTERM or SIGINT, then stops the cluster. A state file left by a control plane that was killed
makes it adopt what still runs (`control_plane.control_plane`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal

from pdserve.config import ClusterConfig, load_config
from pdserve.control_plane import ray_head
from pdserve.control_plane.processes import alive
from pdserve.control_plane.ray_head import RayHead, auth_env, local_cpus, token_for
from pdserve.control_plane.state_file import ClusterState


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.control_plane.main")
    parser.add_argument("--config", default=None)
    parser.add_argument("--state", required=True)
    parser.add_argument("--ray-address", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    if args.ray_address:
        config = dataclasses.replace(config, ray_address=args.ray_address)
    return run(config, args.state)


def run(config: ClusterConfig, state_path: str) -> int:
    token_file, starting_head = "", None
    if config.ray_address is None:  # a Ray head of the cluster's own, asking for its token
        previous = ClusterState.read(state_path) if os.path.exists(state_path) else None
        head_pid = previous.ray_head_pid if previous else None
        token_file = token_for(state_path, head_pid)
        os.environ.update(auth_env(token_file))  # before Ray is imported: it reads them then
        if not alive(head_pid, ray_head.MARK):  # none to adopt: launch ours now, to start while the rest imports
            starting_head = RayHead.launch(local_cpus(config), token_file)
    from pdserve.control_plane.control_plane import ControlPlane

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await ControlPlane(config, state_path, token_file, starting_head).serve(stop)

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
