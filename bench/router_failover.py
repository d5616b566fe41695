"""Routers and the control plane killed under load on a live local cluster (SmolLM2-135M on CPU), with what each
fault cost: requests lost, tokens repeated, KV blocks held after, how long until the router served again, and the
longest a client's stream stalled.

    python -m pdserve.bench.router_failover [--clients 16] [--max-tokens 48] [--json]

Faults, one after another on one cluster (1 prefill + 1 decode worker, one router kept by the control plane):

- `kill_router`: the router SIGKILLed while `clients` greedy streams run, three quarters through the Python client
  and a quarter through `pdserve generate --router` (the control plane starts the router again; clients reconnect);
- `kill_second_router`: a second router (`pdserve router`) serves with the first; clients are given both, half in
  each order; the second is SIGKILLed (nobody restarts it; its clients go on through the first);
- `abandon_router`: a third router's clients (raw gRPC: they never reconnect) lose it for good; the decode worker
  reaps their requests once the lease lapses;
- `kill_control_plane` (its own cluster): the control plane SIGKILLed; requests are served meanwhile; `pdserve up`
  adopts the cluster; `pdserve down` stops it, and no process of it is left.

Every stream is compared with a fault-free run of the same prompt (greedy: any correct run gives the same tokens).
`tests/integration/test_router_failover.py` and `test_control_plane_restart.py` run the same functions and assert.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass

import grpc
import psutil

from pdserve.bench.local_cluster import RunningCluster, start_cluster, stop_cluster
from pdserve.client import SyncClient
from pdserve.control_plane.local_redis import free_port
from pdserve.engine import Message, Prompt, SamplingParams
from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc

LEASE_S = 15
CONFIG = {"engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 256},
          "workers": {"prefill": {"count": 1, "resources": {"cpus": 1}},
                      "decode": {"count": 1, "resources": {"cpus": 1}}},
          "router": {"lease_s": LEASE_S}}
STREAM_TIMEOUT_S = 300


@dataclass(frozen=True)
class Stream:
    """One client's request: its tokens (None if it failed) and the longest gap between two of its tokens."""

    prompt: str
    tokens: tuple[int, ...] | None
    error: str = ""
    longest_gap_s: float = 0.0


@dataclass(frozen=True)
class FaultReport:
    fault: str
    requests: int
    lost: int
    """Streams that failed, or ended with other tokens than the fault-free run's."""
    repeated: int
    """Tokens a client got more than once (beyond the fault-free run's count)."""
    blocks_after: int
    """KV blocks in use on every worker once the cluster is idle (or the lease lapsed)."""
    router_back_s: float | None = None
    """From the kill until the killed router's address served again (None: not restarted)."""
    longest_stall_s: float = 0.0
    """The longest gap between two tokens of one stream: what a client felt."""
    taken_over: int = 0
    """Resumed streams taken over from the worker still running them (the rest were run again)."""
    rerun: int = 0
    workers_restarted: int = 0


def prompts_of(count: int) -> list[str]:
    return [f"Tell me a short story about the number {i}." for i in range(count)]


def run_streams(address: str, prompts: list[str], sampling: SamplingParams, tag: str,
                started: threading.Barrier | None = None) -> list[Stream]:
    """Every prompt streamed at once through `SyncClient(address)` (one or several routers). `started` is waited on
    by each stream once it has its first token."""
    results: list = [None] * len(prompts)

    def one(i: int) -> None:
        tokens, gaps, last = [], [0.0], None
        try:
            with SyncClient(address, timeout_s=STREAM_TIMEOUT_S) as client:
                chat = Prompt(messages=(Message("user", prompts[i]),))
                for response in client.stream(chat, sampling, request_id=f"{tag}-{i}"):
                    now = time.monotonic()
                    gaps.append(now - last if last is not None else 0.0)
                    last = now
                    if not tokens and started is not None:
                        started.wait(STREAM_TIMEOUT_S)
                    tokens += response.token_ids
            results[i] = Stream(prompts[i], tuple(tokens), longest_gap_s=max(gaps))
        except (grpc.RpcError, threading.BrokenBarrierError) as e:
            results[i] = Stream(prompts[i], None, repr(e)[:300], max(gaps))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(STREAM_TIMEOUT_S)
    return results


def reference(cluster: RunningCluster, prompts: list[str], sampling: SamplingParams) -> dict[str, tuple[int, ...]]:
    """The prompts' tokens in a fault-free run."""
    return {s.prompt: s.tokens for s in run_streams(cluster.address, prompts, sampling, "reference")}


# ---- the faults -------------------------------------------------------------------------------------------------
def kill_router(cluster: RunningCluster, expected: dict[str, tuple[int, ...]], sampling: SamplingParams,
                cli_share: float = 0.25, workdir: str | None = None) -> tuple[FaultReport, list[Stream]]:
    """SIGKILL the control plane's router while every prompt in `expected` streams."""
    prompts = list(expected)
    through_cli = prompts[len(prompts) - int(len(prompts) * cli_share):]
    through_python = prompts[:len(prompts) - len(through_cli)]
    pids = worker_pids(cluster)
    before = resumes(cluster)
    cli = _generate_cli(cluster, through_cli, sampling, workdir or tempfile.mkdtemp())
    started = threading.Barrier(len(through_python) + 1)
    python, out = _background(run_streams, cluster.address, through_python, sampling, "kill", started)
    started.wait(STREAM_TIMEOUT_S)  # every Python stream has tokens
    wait_for_in_flight(cluster, len(prompts))  # and the CLI's are in too
    router_pid = cluster.state()["router_pids"][0]
    killed = kill(router_pid)
    back_s = serving_again(cluster.address, killed)
    python.join(STREAM_TIMEOUT_S)
    streams = out[0] + _cli_streams(cli, through_cli)
    after = resumes(cluster)
    report = _report("router SIGKILLed mid-stream (the control plane starts it again)", streams, expected, cluster,
                     back_s, after["taken_over"] - before["taken_over"], after["rerun"] - before["rerun"],
                     _restarted(pids, worker_pids(cluster)))
    return report, streams


def kill_second_router(cluster: RunningCluster, expected: dict[str, tuple[int, ...]],
                       sampling: SamplingParams) -> tuple[FaultReport, list[dict]]:
    """A second router joins (`pdserve router`); clients given both, half in each order; SIGKILL the second.
    Returns the report and the routers `pdserve status` listed before the kill."""
    second = start_router(cluster)
    routers = status(cluster)["routers"]
    pids = worker_pids(cluster)
    prompts = list(expected)
    half = len(prompts) // 2
    started = threading.Barrier(len(prompts) + 1)
    both, other = f"{cluster.address},{second.address}", f"{second.address},{cluster.address}"
    first, a = _background(run_streams, both, prompts[:half], sampling, "ab", started)
    rest, b = _background(run_streams, other, prompts[half:], sampling, "ba", started)
    started.wait(STREAM_TIMEOUT_S)
    before = resumes(cluster)
    kill(second.pid)
    first.join(STREAM_TIMEOUT_S)
    rest.join(STREAM_TIMEOUT_S)
    after = resumes(cluster)
    report = _report("one of two routers SIGKILLed (not restarted; its clients move to the other)", a[0] + b[0],
                     expected, cluster, None, after["taken_over"] - before["taken_over"],
                     after["rerun"] - before["rerun"], _restarted(pids, worker_pids(cluster)))
    return report, routers


@dataclass(frozen=True)
class AbandonReport:
    requests: int
    held: int
    """KV blocks the abandoned requests held after the kill."""
    blocks_after: int
    """KV blocks in use once the lease lapsed."""
    freed_s: float
    """From the kill until every block was free."""
    reaped: int
    """Requests the decode workers reaped (since the cluster started)."""


def abandon_router(cluster: RunningCluster, requests: int = 4) -> AbandonReport:
    """A router SIGKILLed under `requests` long streams whose clients never reconnect."""
    router = start_router(cluster)
    long = pb.SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)  # far longer than the lease
    with grpc.insecure_channel(router.address) as channel:  # raw calls: nobody reconnects
        stub = pb_grpc.GenerationStub(channel)
        calls = [stub.Generate(pb.GenerateRequest(text=f"Count to {n}:", sampling=long), timeout=STREAM_TIMEOUT_S)
                 for n in range(requests)]
        for call in calls:
            next(call)  # decoding now
        killed = kill(router.pid)
    held = wait_for_blocks_held(cluster)
    workers = cluster.wait_until_idle(timeout_s=LEASE_S + 30)
    freed_s = time.monotonic() - killed
    return AbandonReport(requests, held, sum(w["used"] for w in workers.values()), freed_s, int(reaped(cluster)))


# ---- what the faults need ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Router:
    address: str
    pid: int


def start_router(cluster: RunningCluster) -> Router:
    port = free_port()
    done = cluster.pdserve("router", "--detach", "--port", str(port), "--http-port", str(free_port()))
    if done.returncode != 0:
        raise RuntimeError(f"pdserve router failed: {done.stderr[-2000:]}")
    address = f"127.0.0.1:{port}"
    entry = next(r for r in status(cluster)["routers"] if r["address"] == address)
    return Router(address, entry["pid"])


def status(cluster: RunningCluster) -> dict:
    return json.loads(cluster.pdserve("status", "--json").stdout)


def kill(pid: int) -> float:
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def serving_again(address: str, since: float, limit_s: float = 60) -> float:
    """Seconds from `since` until the router at `address` answers a health check as serving."""
    while time.monotonic() < since + limit_s:
        try:
            with SyncClient(address, timeout_s=2, retries=0) as client:
                if client.health().healthy:
                    return time.monotonic() - since
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no router served at {address} {limit_s:.0f} s after the kill")


def wait_for_in_flight(cluster: RunningCluster, count: int) -> None:
    """Until the cluster's first router holds `count` requests."""
    deadline = time.monotonic() + STREAM_TIMEOUT_S
    while status(cluster)["requests"]["in_flight"] < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} requests reached the router")
        time.sleep(0.2)


def wait_for_blocks_held(cluster: RunningCluster, timeout_s: float = 10) -> int:
    """KV blocks in use once the workers' heartbeats show some (0 if none within `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        held = sum(w["used"] for w in cluster.workers().values())
        if held:
            return held
        time.sleep(0.2)
    return 0


def worker_pids(cluster: RunningCluster) -> dict[str, int]:
    return {worker_id: w["pid"] for worker_id, w in cluster.workers().items()}


def resumes(cluster: RunningCluster) -> dict[str, float]:
    """The first router's pdserve_request_resumes_total, by how."""
    return {how: cluster.router_metric(f'pdserve_request_resumes_total{{how="{how}"}}') for how in
            ("taken_over", "rerun")}


def reaped(cluster: RunningCluster) -> float:
    """Requests the decode workers reaped, from every worker's metrics gathered by the router."""
    url = cluster.http_url.removesuffix("/v1") + "/metrics/workers"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("pdserve_worker_requests_reaped_total"))


def _report(fault: str, streams: list[Stream], expected: dict[str, tuple[int, ...]], cluster: RunningCluster,
            back_s: float | None, taken_over: float = 0, rerun: float = 0, workers_restarted: int = 0) -> FaultReport:
    lost = sum(1 for s in streams if s.tokens != expected[s.prompt])
    repeated = sum(max(0, len(s.tokens) - len(expected[s.prompt])) for s in streams if s.tokens is not None)
    workers = cluster.wait_until_idle()
    return FaultReport(fault, len(streams), lost, repeated, sum(w["used"] for w in workers.values()), back_s,
                       max((s.longest_gap_s for s in streams), default=0.0), int(taken_over), int(rerun),
                       workers_restarted)


def _restarted(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(1 for worker_id, pid in before.items() if after.get(worker_id) != pid)


def _background(fn, *args) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    return thread, out


def _generate_cli(cluster: RunningCluster, prompts: list[str], sampling: SamplingParams,
                  workdir: str) -> subprocess.Popen:
    """`pdserve generate --router ... --json` over `prompts`, started now."""
    path = os.path.join(workdir, "prompts.jsonl")
    with open(path, "w") as f:
        for i, prompt in enumerate(prompts):
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt}], "request_id": f"cli-{i}"}) + "\n")
    return subprocess.Popen([sys.executable, "-m", "pdserve.cli", "generate", "--router", cluster.address, "--input",
                             path, "--json", "--max-tokens", str(sampling.max_tokens), "--concurrency",
                             str(len(prompts))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cli_streams(cli: subprocess.Popen, prompts: list[str]) -> list[Stream]:
    out, err = cli.communicate(timeout=STREAM_TIMEOUT_S)
    lines = [json.loads(line) for line in out.splitlines()]
    if cli.returncode != 0 or len(lines) != len(prompts):
        return [Stream(p, None, f"pdserve generate exited {cli.returncode}: {err[-300:]}") for p in prompts]
    return [Stream(p, tuple(line["token_ids"])) for p, line in zip(prompts, lines)]


# ---- the control plane ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ControlPlaneReport:
    served_while_down: int
    """Requests answered (token-identical) while the control plane was dead."""
    lost_while_down: int
    scale_refusal: str
    """What `pdserve scale` said while the control plane was dead (the workers' owner is gone)."""
    workers_restarted: int
    """By the adoption (`pdserve up` again): 0 when it adopts them."""
    routers_restarted: int
    adopt_s: float
    """`pdserve up` again, until it returned (the cluster serving under the new control plane)."""
    left_after_down: int
    """Processes of the cluster (Redis, the Ray head's tree, routers, the control plane) still running after
    `pdserve down`."""
    log_runs_kept: int
    """`pdserve up` runs the cluster log still shows (2: the killed run's record was kept)."""


def kill_control_plane(state_dir: str, requests: int = 4) -> ControlPlaneReport:
    cluster = start_cluster(state_dir, {k: v for k, v in CONFIG.items() if k != "router"})
    sampling = SamplingParams(max_tokens=8, temperature=0)
    state = cluster.state()
    expected = reference(cluster, prompts_of(requests), sampling)
    workers = worker_pids(cluster)
    cluster_pids = _tree(state["ray_head_pid"]) | {state["redis_pid"], *state["router_pids"]}
    kill(state["pid"])
    served = run_streams(cluster.address, list(expected), sampling, "down")
    refusal = cluster.pdserve("scale", "--decode", "2").stderr.strip()
    started = time.monotonic()
    again = cluster.pdserve("up", "--detach", "--config", os.path.join(state_dir, "cluster.yaml"), timeout_s=600)
    if again.returncode != 0:
        raise RuntimeError(f"pdserve up (adopting) failed: {again.stderr[-2000:]}")
    adopt_s = time.monotonic() - started
    adopted = cluster.state()
    after = worker_pids(cluster)
    cluster_pids |= _tree(adopted["ray_head_pid"]) | {adopted["pid"]}
    stop_cluster(cluster)
    left = _running(cluster_pids, deadline_s=30)
    with open(os.path.join(state_dir, "cluster.log")) as f:
        runs = f.read().count("==== pdserve up at")
    return ControlPlaneReport(sum(1 for s in served if s.tokens == expected[s.prompt]),
                              sum(1 for s in served if s.tokens != expected[s.prompt]), refusal,
                              _restarted(workers, after),
                              len(set(state["router_pids"]) - set(adopted["router_pids"])), adopt_s, len(left), runs)


def _tree(pid: int) -> set[int]:
    return {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}


def _running(pids: set[int], deadline_s: float) -> set[int]:
    """Of `pids`, those still running (not zombies) after waiting up to `deadline_s` for them to end."""
    deadline = time.monotonic() + deadline_s
    while True:
        left = {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


# ---- the command -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.bench.router_failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    reports = []
    with tempfile.TemporaryDirectory() as state_dir:
        cluster = start_cluster(state_dir, CONFIG)
        try:
            expected = reference(cluster, prompts_of(args.clients), sampling)
            reports.append(kill_router(cluster, expected, sampling, workdir=state_dir)[0])
            reports.append(kill_second_router(cluster, expected, sampling)[0])
            abandoned = abandon_router(cluster)
        finally:
            stop_cluster(cluster)
    with tempfile.TemporaryDirectory() as state_dir:
        control = kill_control_plane(state_dir)
    result = {"faults": [asdict(r) for r in reports], "abandoned": asdict(abandoned), "control_plane": asdict(control)}
    if args.json:
        print(json.dumps(result))
        return 0
    for r in reports:
        back = f"{r.router_back_s:.1f} s" if r.router_back_s is not None else "-"
        print(f"{r.fault}: {r.requests} requests, lost {r.lost}, repeated {r.repeated}, blocks after "
              f"{r.blocks_after}, router back {back}, longest stall {r.longest_stall_s:.1f} s, taken over "
              f"{r.taken_over}, rerun {r.rerun}, workers restarted {r.workers_restarted}")
    print(f"abandoned router: {abandoned.requests} requests held {abandoned.held} blocks; every block free "
          f"{abandoned.freed_s:.1f} s after the kill (lease {LEASE_S} s), {abandoned.reaped} requests reaped, "
          f"{abandoned.blocks_after} blocks held after")
    print(f"control plane SIGKILLed: {control.served_while_down} requests served meanwhile, lost "
          f"{control.lost_while_down}; `pdserve up` adopted in {control.adopt_s:.1f} s (workers restarted "
          f"{control.workers_restarted}, routers restarted {control.routers_restarted}); after `pdserve down` "
          f"{control.left_after_down} processes left; runs in the log {control.log_runs_kept}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
