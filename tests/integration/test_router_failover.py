"""Routers that come and go, on a live cluster (`pdserve up`: 1 prefill + 1 decode worker on SmolLM2, a control plane
keeping one router running): every stream survives its router, token for token, no worker restarts, and no KV
block stays held.

- The router is SIGKILLed under 16 streaming clients (12 Python clients and `pdserve generate --router` with 4
  prompts): the control plane starts it again within 10 s, the clients reconnect and their requests are taken
  over from the decode worker; every stream ends token-identical to a fault-free run.
- A second router (`pdserve router`) serves the same workers; clients given both routers lose one of them to
  SIGKILL and go on through the other.
- A router killed for good, whose clients never come back: the decode worker reaps their requests when the lease
  lapses (`router.lease_s`), and every block is free again.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from pdserve.bench.local_cluster import start_cluster, stop_cluster
from pdserve.client import SyncClient
from pdserve.control_plane.local_redis import free_port
from pdserve.engine import Message, Prompt, SamplingParams
from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.model

LEASE_S = 15
CONFIG = {"engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 256},
          "workers": {"prefill": {"count": 1, "resources": {"cpus": 1}},
                      "decode": {"count": 1, "resources": {"cpus": 1}}},
          "router": {"lease_s": LEASE_S}}
SAMPLING = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
PROMPTS = [f"Tell me a short story about the number {i}." for i in range(16)]
RESTART_LIMIT_S = 10
STREAM_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = start_cluster(str(tmp_path_factory.mktemp("failover")), CONFIG)
    yield running
    stop_cluster(running)


@pytest.fixture(scope="module")
def reference(cluster) -> dict[str, list[int]]:
    """The prompts' tokens from a fault-free run, each prompt by itself (greedy: what any run must give)."""
    return {prompt: tokens for prompt, tokens in zip(PROMPTS, streams(cluster.address, PROMPTS, "reference"))}


def streams(address: str, prompts: list[str], tag: str, started: threading.Barrier | None = None) -> list[list[int]]:
    """Every prompt streamed at once through `SyncClient(address)`; each stream's tokens (an exception if it
    failed). `started` is waited on by every stream once it has its first token."""
    results: list = [None] * len(prompts)

    def one(i: int) -> None:
        try:
            with SyncClient(address, timeout_s=STREAM_TIMEOUT_S) as client:
                tokens = []
                for response in client.stream(Prompt(messages=(Message("user", prompts[i]),)), SAMPLING,
                                              request_id=f"{tag}-{i}"):
                    if not tokens and started is not None:
                        started.wait(STREAM_TIMEOUT_S)
                    tokens += response.token_ids
                results[i] = tokens
        except (grpc.RpcError, threading.BrokenBarrierError) as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(STREAM_TIMEOUT_S)
    return results


def in_background(fn, *args) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    return thread, out


def kill(pid: int) -> float:
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def serving_again(cluster, since: float) -> float:
    """Seconds from `since` until the cluster's router address answers a health check as serving."""
    deadline = since + 60
    while time.monotonic() < deadline:
        try:
            with SyncClient(cluster.address, timeout_s=2, retries=0) as client:
                if client.health().healthy:
                    return time.monotonic() - since
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the router did not come back")


def wait_for_in_flight(cluster, count: int) -> None:
    """Until the cluster's router holds `count` requests."""
    deadline = time.monotonic() + STREAM_TIMEOUT_S
    while json.loads(cluster.pdserve("status", "--json").stdout)["requests"]["in_flight"] < count:
        assert time.monotonic() < deadline, f"fewer than {count} requests reached the router"
        time.sleep(0.2)


def reaped(cluster) -> float:
    """Requests the decode workers reaped, from every worker's metrics gathered by the router."""
    url = cluster.http_url.removesuffix("/v1") + "/metrics/workers"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("pdserve_worker_requests_reaped_total"))


def worker_pids(cluster) -> dict[str, int]:
    return {worker_id: w["pid"] for worker_id, w in cluster.workers().items()}


def test_a_router_killed_mid_stream_restarts_and_every_stream_completes_token_identical(cluster, reference, tmp_path):
    pids = worker_pids(cluster)
    inputs = tmp_path / "prompts.jsonl"
    inputs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}], "request_id": f"cli-{i}"})
                              + "\n" for i, p in enumerate(PROMPTS[12:])))
    cli = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "generate", "--router", cluster.address, "--input",
                            str(inputs), "--json", "--max-tokens", str(SAMPLING.max_tokens), "--concurrency", "4"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = threading.Barrier(13)
    python, results = in_background(streams, cluster.address, PROMPTS[:12], "kill", started)
    started.wait(STREAM_TIMEOUT_S)  # every Python stream has tokens
    wait_for_in_flight(cluster, len(PROMPTS))  # and the CLI's four are in too
    router_pid = cluster.state()["router_pids"][0]
    restart_s = serving_again(cluster, kill(router_pid))
    python.join(STREAM_TIMEOUT_S)
    out, err = cli.communicate(timeout=STREAM_TIMEOUT_S)
    assert cli.returncode == 0, err[-2000:]
    assert results[0] == [reference[p] for p in PROMPTS[:12]]
    from_cli = [json.loads(line) for line in out.splitlines()]
    assert [line["token_ids"] for line in from_cli] == [reference[p] for p in PROMPTS[12:]]
    assert restart_s < RESTART_LIMIT_S, f"the router served again {restart_s:.1f} s after it was killed"
    assert cluster.state()["router_pids"][0] != router_pid  # a new router process, on the same address
    assert worker_pids(cluster) == pids  # no worker restarted
    assert cluster.router_metric('pdserve_request_resumes_total{how="taken_over"}') >= 1
    workers = cluster.wait_until_idle()
    assert all(w["used"] == 0 and w["running"] == 0 for w in workers.values()), workers


def test_two_routers_share_the_workers_and_one_killed_loses_nothing(cluster, reference):
    port, http_port = free_port(), free_port()
    started = cluster.pdserve("router", "--detach", "--port", str(port), "--http-port", str(http_port))
    assert started.returncode == 0, started.stderr
    second = f"127.0.0.1:{port}"
    status = json.loads(cluster.pdserve("status", "--json").stdout)
    routers = {r["address"]: r for r in status["routers"]}
    assert set(routers) == {cluster.address, second} and status["control_plane"]["up"]
    barrier = threading.Barrier(17)
    first_half, a = in_background(streams, f"{cluster.address},{second}", PROMPTS[:8], "ab", barrier)
    second_half, b = in_background(streams, f"{second},{cluster.address}", PROMPTS[8:], "ba", barrier)
    barrier.wait(STREAM_TIMEOUT_S)
    kill(routers[second]["pid"])  # not the control plane's: nobody starts it again
    first_half.join(STREAM_TIMEOUT_S)
    second_half.join(STREAM_TIMEOUT_S)
    assert a[0] + b[0] == [reference[p] for p in PROMPTS]
    workers = cluster.wait_until_idle()
    assert all(w["used"] == 0 and w["running"] == 0 for w in workers.values()), workers
    deadline = time.monotonic() + 15  # its registry entry expires
    while time.monotonic() < deadline:
        status = json.loads(cluster.pdserve("status", "--json").stdout)
        if [r["address"] for r in status["routers"]] == [cluster.address]:
            break
        time.sleep(1)
    assert [r["address"] for r in status["routers"]] == [cluster.address]


def test_the_requests_of_a_router_gone_for_good_are_reaped_when_its_lease_lapses(cluster):
    port = free_port()
    started = cluster.pdserve("router", "--detach", "--port", str(port), "--http-port", str(free_port()))
    assert started.returncode == 0, started.stderr
    status = json.loads(cluster.pdserve("status", "--json").stdout)
    router = next(r for r in status["routers"] if r["address"] == f"127.0.0.1:{port}")
    long = pb.SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)  # far longer than the lease
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # raw calls: nobody reconnects
        calls = [pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(text=f"Count to {n}:", sampling=long),
                                                          timeout=STREAM_TIMEOUT_S) for n in range(4)]
        for call in calls:
            next(call)  # decoding now
        killed = kill(router["pid"])
    deadline = time.monotonic() + 10  # the abandoned requests hold blocks (seen with the next heartbeats)
    busy = cluster.workers()
    while not any(w["used"] for w in busy.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
        busy = cluster.workers()
    assert any(w["used"] for w in busy.values()), busy
    workers = cluster.wait_until_idle(timeout_s=LEASE_S + 30)
    assert all(w["used"] == 0 and w["running"] == 0 for w in workers.values()), workers
    assert time.monotonic() - killed < LEASE_S + 30 and reaped(cluster) == 4
