"""The control plane itself killed (SIGKILL) on a live cluster: the workers and the router serve on; `pdserve up`
again adopts them (no worker or router restarts); the cluster's log keeps the crash's record; and `pdserve down`
then leaves nothing of the cluster running (no redis-server, no Ray process, no router)."""

import json
import os
import signal
import time

import psutil
import pytest

from pdserve.bench.local_cluster import start_cluster
from pdserve.client import SyncClient
from pdserve.engine import SamplingParams

pytestmark = pytest.mark.model

CONFIG = {"engine": {"num_kv_blocks": 256, "max_num_batched_tokens": 256},
          "workers": {"prefill": {"count": 1, "resources": {"cpus": 1}},
                      "decode": {"count": 1, "resources": {"cpus": 1}}}}
GREEDY = SamplingParams(max_tokens=8, temperature=0)


def tree(pid: int) -> set[int]:
    """`pid` and every process under it."""
    root = psutil.Process(pid)
    return {pid} | {p.pid for p in root.children(recursive=True)}


def running(pids: set[int]) -> set[int]:
    return {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}


def answer(address: str) -> tuple[int, ...]:
    with SyncClient(address, timeout_s=60) as client:
        return client.generate("The capital of France is", GREEDY).token_ids


def test_a_killed_control_plane_leaves_the_cluster_serving_and_is_adopted_then_down_stops_everything(tmp_path):
    cluster = start_cluster(str(tmp_path), CONFIG)
    state = cluster.state()
    expected = answer(cluster.address)
    workers = {worker_id: w["pid"] for worker_id, w in cluster.workers().items()}
    cluster_pids = tree(state["ray_head_pid"]) | {state["redis_pid"], *state["router_pids"]}
    assert set(workers.values()) <= cluster_pids  # the worker processes live under the Ray head

    os.kill(state["pid"], signal.SIGKILL)
    time.sleep(2)  # its registry entry (the Control service's address) outlives it by a TTL; serving is untouched
    assert answer(cluster.address) == expected
    status = json.loads(cluster.pdserve("status", "--json").stdout)
    assert {w["worker_id"]: w["pid"] for w in status["workers"]} == workers
    scale = cluster.pdserve("scale", "--decode", "2")  # the workers' owner is gone: refused, named
    assert scale.returncode == 1 and "control plane is not running" in scale.stderr, scale.stderr

    again = cluster.pdserve("up", "--detach", "--config", os.path.join(str(tmp_path), "cluster.yaml"),
                            timeout_s=600)
    assert again.returncode == 0, again.stderr[-3000:]
    adopted = cluster.state()
    assert adopted["pid"] != state["pid"]
    assert (adopted["redis_pid"], adopted["ray_head_pid"], adopted["router_pids"]) == \
        (state["redis_pid"], state["ray_head_pid"], state["router_pids"])
    assert {worker_id: w["pid"] for worker_id, w in cluster.workers().items()} == workers
    assert answer(cluster.address) == expected
    status = json.loads(cluster.pdserve("status", "--json").stdout)
    assert status["control_plane"]["up"]

    cluster_pids |= tree(adopted["ray_head_pid"]) | {adopted["pid"]}
    down = cluster.pdserve("down", timeout_s=180)
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 30
    while running(cluster_pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = running(cluster_pids)
    assert not left, [psutil.Process(p).cmdline()[:3] for p in left]
    log = open(os.path.join(str(tmp_path), "cluster.log")).read()
    assert log.count("==== pdserve up at") == 2  # the killed run's record is kept
    assert "adopted 2 running workers" in log
