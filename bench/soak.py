"""A bounded soak on a real local cluster (SmolLM2-135M on CPU): many short requests, some cancelled mid-flight.

    python -m pdserve.bench.soak [--requests 2000] [--concurrency 32] [--cancel 0.2] [--kill-every 100] [--json]

Each request is a short greedy chat (4-16 output tokens). A seeded share of them is cancelled by the client at a
random point: before its first token, or after a few tokens (the stream is left), which exercises every abort path
(queued for KV room, queued or running on the prefill worker, KV on the wire, decoding). Every `--sample-every`
requests it records each worker's resident memory (VmRSS) and KV blocks in use. At the end it waits for the
cluster to go idle and reports the blocks still in use (a leak if not zero) and how memory moved from the first
sample after warm-up to the last. With `--kill-every N`, every N ended requests one worker is SIGKILLed (decode
and prefill in turn): the requests on it must resume elsewhere (nothing lost), and the router, which lives through
all of it, must not grow (it is sampled too). Each completed request's tokens are compared with the first completion
of the same prompt and length (greedy: they must be equal); `wrong` counts those that differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import tempfile
import time
from dataclasses import asdict, dataclass

import grpc

from pdserve.bench.local_cluster import RunningCluster, start_cluster, stop_cluster
from pdserve.client import Client
from pdserve.engine import Message, Prompt, SamplingParams

CONFIG = {"engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 256},
          "workers": {"prefill": {"count": 1, "resources": {"cpus": 1}},
                      "decode": {"count": 1, "resources": {"cpus": 1}}}}
TOPICS = ["the sea", "a city at night", "mountains", "a library", "trains", "coffee", "the moon", "a garden"]


@dataclass(frozen=True)
class MemorySample:
    done: int
    """Requests ended when it was taken."""
    rss_mib: dict[str, float]
    kv_blocks_used: dict[str, int]


@dataclass(frozen=True)
class SoakReport:
    requests: int
    completed: int
    cancelled: int
    failed: int
    """Ended with an error status (should be 0)."""
    wrong: int
    """Completed with other tokens than the first completion of the same prompt and length (should be 0)."""
    killed: tuple[str, ...]
    """The workers SIGKILLed on the way (`--kill-every`)."""
    seconds: float
    leaked_blocks: dict[str, int]
    """KV blocks in use per worker once the cluster is idle (0 = no leak)."""
    rss_growth_mib: dict[str, float]
    """Per worker: last sample minus the first sample after warm-up."""
    samples: tuple[MemorySample, ...]


def rss_mib(pid: int) -> float | None:
    """The process's resident memory; None when it is gone (a worker just killed, not yet out of the listing)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next((line for line in f if line.startswith("VmRSS:")), None)
    except FileNotFoundError:
        return None
    return int(line.split()[1]) / 1024 if line is not None else None


def sample(cluster: RunningCluster, done: int) -> MemorySample:
    workers = cluster.workers()
    rss = {i: rss_mib(w["pid"]) for i, w in workers.items()}
    rss["router"] = rss_mib(cluster.state()["router_pids"][0])
    return MemorySample(done, {i: v for i, v in rss.items() if v is not None},
                        {i: w["used"] for i, w in workers.items()})


def kill_one(cluster: RunningCluster, role: str) -> str:
    """SIGKILL a worker of `role`; returns its id ("" when none is up: the last one's replacement is starting)."""
    found = next(((i, w) for i, w in sorted(cluster.workers().items()) if w["role"] == role), None)
    if found is None:
        return ""
    os.kill(found[1]["pid"], signal.SIGKILL)
    return found[0]


async def one(client: Client, rng: random.Random, cancel_share: float, seen_tokens: dict) -> str:
    """'completed', 'wrong' (completed with other tokens than before), 'cancelled' or 'failed: <status>'."""
    topic, max_tokens = rng.choice(TOPICS), rng.randint(4, 16)
    prompt = Prompt(messages=(Message("user", f"Say something short about {topic}."),))
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0)
    cut_after = rng.randint(0, 3) if rng.random() < cancel_share else None  # tokens seen before leaving
    stream = client.stream(prompt, sampling)
    seen, tokens = 0, []
    try:
        if cut_after == 0:
            await asyncio.sleep(rng.uniform(0.0, 0.05))  # in the queue, on the prefill worker or in the handoff
            stream.cancel()
            return "cancelled"
        async for response in stream:
            seen += len(response.token_ids)
            tokens += response.token_ids
            if cut_after is not None and seen >= cut_after and not response.finish_reason:
                stream.cancel()
                return "cancelled"
        return "completed" if seen_tokens.setdefault((topic, max_tokens), tokens) == tokens else "wrong"
    except grpc.aio.AioRpcError as e:
        return "cancelled" if e.code() is grpc.StatusCode.CANCELLED else f"failed: {e.code().name}"


async def soak(cluster: RunningCluster, requests: int, concurrency: int, cancel_share: float,
               sample_every: int, seed: int = 0, kill_every: int = 0) -> SoakReport:
    rng = random.Random(seed)
    outcomes: list[str] = []
    samples: list[MemorySample] = []
    seen_tokens: dict = {}
    killed: list[str] = []
    started = time.monotonic()
    async with Client(cluster.address, timeout_s=300) as client:
        todo = iter(range(requests))

        async def worker() -> None:
            for _ in todo:
                outcomes.append(await one(client, rng, cancel_share, seen_tokens))
                if kill_every and len(outcomes) % kill_every == 0 and len(outcomes) < requests:
                    role = ("decode", "prefill")[len(killed) % 2]
                    killed.append(await asyncio.to_thread(kill_one, cluster, role))
                if len(outcomes) % sample_every == 0:
                    samples.append(await asyncio.to_thread(sample, cluster, len(outcomes)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.monotonic() - started
    idle = await asyncio.to_thread(cluster.wait_until_idle, 60)
    samples.append(await asyncio.to_thread(sample, cluster, len(outcomes)))
    warm = samples[1] if len(samples) > 2 else samples[0]  # the first sample still includes warm-up
    return SoakReport(
        requests=requests, completed=outcomes.count("completed"), cancelled=outcomes.count("cancelled"),
        failed=sum(1 for o in outcomes if o.startswith("failed")), wrong=outcomes.count("wrong"),
        killed=tuple(killed), seconds=seconds,
        leaked_blocks={i: w["used"] for i, w in idle.items()},
        rss_growth_mib={i: samples[-1].rss_mib[i] - warm.rss_mib.get(i, samples[-1].rss_mib[i])
                        for i in samples[-1].rss_mib},
        samples=tuple(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cancel", type=float, default=0.2, help="share of requests the client cancels")
    parser.add_argument("--sample-every", type=int, default=200)
    parser.add_argument("--kill-every", type=int, default=0, help="SIGKILL a worker every this many requests")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cluster = start_cluster(tempfile.mkdtemp(prefix="pdserve-soak-"), CONFIG)
    try:
        report = asyncio.run(soak(cluster, args.requests, args.concurrency, args.cancel, args.sample_every,
                                  kill_every=args.kill_every))
    finally:
        stop_cluster(cluster)
    if args.json:
        print(json.dumps(asdict(report), indent=1))
        return
    print(f"{report.requests} requests in {report.seconds:.0f} s: {report.completed} completed, "
          f"{report.cancelled} cancelled, {report.failed} failed, {report.wrong} with other tokens; "
          f"{len(report.killed)} workers killed")
    print(f"KV blocks in use once idle: {report.leaked_blocks}")
    for s in report.samples:
        rss = ", ".join(f"{i} {v:.0f} MiB" for i, v in sorted(s.rss_mib.items()))
        print(f"  after {s.done:5d}: {rss}; blocks {s.kv_blocks_used}")
    growth = ", ".join(f"{i} {v:+.1f} MiB" for i, v in sorted(report.rss_growth_mib.items()))
    print(f"RSS growth after warm-up: {growth}")


if __name__ == "__main__":
    main()
