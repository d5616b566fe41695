"""A whole local cluster from Python, for tests and benchmarks: `pdserve up --detach` in a subprocess (its own
redis-server, Ray head, the workers, the router on 127.0.0.1) with its own state folder, then `pdserve down`.

    cluster = start_cluster("/tmp/run", {"mode": "colocated"})   # a config as a dict; the router's ports are picked
    ... Client(cluster.address) ...
    stop_cluster(cluster)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import yaml

from pdserve.control_plane.local_redis import free_port
from pdserve.control_plane.state_file import ClusterState


@dataclass(frozen=True)
class RunningCluster:
    address: str
    state_dir: str

    def pdserve(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], capture_output=True, text=True,
                              timeout=timeout_s, env={**os.environ, "PDSERVE_STATE_DIR": self.state_dir})

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (http://host:port/v1)."""
        return f"http://{self.state()['http_address']}/v1"

    @property
    def state_file(self) -> str:
        return os.path.join(self.state_dir, "cluster.json")

    def state(self) -> dict:
        with open(self.state_file) as f:
            return json.load(f)

    def workers(self) -> dict[str, dict]:
        async def ask():
            async with ClusterState.read(self.state_file).client(timeout_s=10) as client:
                return await client.status()

        status = asyncio.run(ask())
        return {w.worker_id: {"role": w.role, "used": w.kv_blocks_used, "running": w.running_requests, "pid": w.pid}
                for w in status.workers}

    def router_metric(self, name: str) -> float:
        """The sum of a router Prometheus metric's samples (every label), read from its /metrics now."""
        url = f"http://{self.state()['metrics_address']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def wait_until_idle(self, timeout_s: float = 15) -> dict[str, dict]:
        """Every worker reports zero KV blocks in use and nothing running (heartbeats lag by up to a second)."""
        deadline = time.monotonic() + timeout_s
        while True:
            workers = self.workers()
            if all(w["used"] == 0 and w["running"] == 0 for w in workers.values()) or time.monotonic() > deadline:
                return workers
            time.sleep(0.25)


def start_cluster(state_dir: str, config: dict, up_args: tuple[str, ...] = ()) -> RunningCluster:
    """`pdserve up --detach` with `config` (and `up_args`, e.g. ("--ray-address", ADDRESS))."""
    config = {**config, "router": {**config.get("router", {}), "host": "127.0.0.1", "port": free_port(),
                                    "http_port": free_port()}}
    path = os.path.join(state_dir, "cluster.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    cluster = RunningCluster(f"127.0.0.1:{config['router']['port']}", state_dir)
    done = cluster.pdserve("up", "--detach", "--config", path, *up_args, timeout_s=600)
    if done.returncode != 0:
        raise RuntimeError(f"pdserve up failed ({done.returncode}): {done.stderr[-3000:]}")
    return cluster


def stop_cluster(cluster: RunningCluster) -> None:
    done = cluster.pdserve("down", timeout_s=120)
    if done.returncode != 0:
        raise RuntimeError(f"pdserve down failed: {done.stderr[-2000:]}")
