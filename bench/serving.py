"""Serving benchmarks on a real local cluster (SmolLM2-135M on CPU, `pdserve up` in a subprocess), side by side.

    python -m pdserve.bench.serving overhead [--json]   # router + Ray overhead at 1 and at 32 concurrent requests
    python -m pdserve.bench.serving mixed [--json]      # disaggregated vs colocated on a mixed workload
    python -m pdserve.bench.serving layerwise [--json]  # KV handed over after the prefill, or streamed during it
    python -m pdserve.bench.serving handoff [--json]    # KV over gloo sockets, or copied over IPC (same node)

overhead: on a 1 prefill + 1 decode cluster, client TTFT minus the prefill worker's own prefill time (first chunk ->
first token), for 16 requests one at a time and for 32 at once. At 32 the difference is mostly queueing, so it is
also shown without the queue (router wait + the worker's queue): what is left is gRPC, Ray calls and the router.

mixed: the same seeded workload against a disaggregated cluster (1 prefill + 1 decode worker, 1 core each) and a
colocated one (1 worker, 2 cores): short chats (48 output tokens) plus a few 1-2k-token prompts (16 output tokens),
Poisson arrivals. TTFT and TPOT are measured at the client; p50/p90/p99.

layerwise: 1 prefill + 1 decode worker, 1 core each; 12 prompts of 1-2k tokens, one at a time, 4 output tokens;
clusters with `kv_transfer.layerwise` off and on, twice each in turn (off, on, off, on). The handoff lies between the
first token (sent by the prefill worker) and the second: both are timed at the client.

handoff: the same run, with `kv_transfer.backend` gloo and auto (ipc: both workers are on this machine), in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from pdserve.bench.local_cluster import start_cluster, stop_cluster
from pdserve.client import Client
from pdserve.engine import Message, Prompt, SamplingParams

ENGINE = {"num_kv_blocks": 2048, "max_num_batched_tokens": 256}
DISAGGREGATED = {"engine": ENGINE, "workers": {"prefill": {"count": 1, "resources": {"cpus": 1}},
                                                "decode": {"count": 1, "resources": {"cpus": 1}}}}
COLOCATED = {"mode": "colocated", "engine": ENGINE, "workers": {"colocated": {"count": 1, "resources": {"cpus": 2}}}}
TOPICS = ["the sea", "a city at night", "mountains", "a library", "trains", "coffee", "the moon", "a garden"]


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    tpot_s: float
    tokens: int
    prefill_s: float
    queue_s: float
    long: bool


async def measure(client: Client, prompt: Prompt, sampling: SamplingParams, long: bool = False) -> Sample:
    start = time.monotonic()
    first = last = None
    tokens = 0
    final = None
    async for response in client.stream(prompt, sampling):
        now = time.monotonic()
        if response.token_ids:
            first = first or now
            last = now
            tokens += len(response.token_ids)
        final = response
    tpot = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return Sample(first - start, tpot, tokens, final.timings.prefill_s, final.timings.queue_s, long)


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)} if values else {}


# ---- overhead --------------------------------------------------------------------------------------------------
async def overhead_run(address: str) -> dict:
    sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [Prompt(messages=(Message("user", f"Write two sentences about {TOPICS[i % 8]}, number {i}."),))
               for i in range(32)]
    async with Client(address, timeout_s=600) as client:
        for p in prompts[:2]:
            await measure(client, p, sampling)  # warm-up
        one = [await measure(client, p, sampling) for p in prompts[:16]]
        many = await asyncio.gather(*(measure(client, p, sampling) for p in prompts))
    report = {}
    for name, samples in (("1 at a time", one), ("32 at once", many)):
        report[name] = {
            "client_ttft": percentiles([s.ttft_s for s in samples]),
            "worker_prefill": percentiles([s.prefill_s for s in samples]),
            "ttft_minus_prefill": percentiles([s.ttft_s - s.prefill_s for s in samples]),
            "ttft_minus_prefill_and_queue": percentiles([s.ttft_s - s.prefill_s - s.queue_s for s in samples]),
        }
    return report


# ---- mixed workload --------------------------------------------------------------------------------------------
def mixed_workload(seed: int = 0, short: int = 36, long: int = 4, rate: float = 0.8):
    """[(arrival_s, prompt, sampling, is_long)], the same for every mode."""
    rng = random.Random(seed)
    items = []
    for _ in range(short):
        words = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(3, 30)))
        prompt = Prompt(messages=(Message("user", f"Tell me something about: {words}."),))
        items.append((prompt, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True), False))
    for _ in range(long):
        ids = tuple(rng.randrange(1000, 40000) for _ in range(rng.randint(1000, 2000)))
        items.append((Prompt(token_ids=ids), SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), True))
    rng.shuffle(items)
    arrivals, t = [], 0.0
    for prompt, sampling, is_long in items:
        t += rng.expovariate(rate)
        arrivals.append((t, prompt, sampling, is_long))
    return arrivals


async def mixed_run(address: str, workload) -> list[Sample]:
    async with Client(address, timeout_s=900) as client:
        await measure(client, Prompt(text="warm up"), SamplingParams(max_tokens=4, temperature=0))
        start = time.monotonic()

        async def at(arrival, prompt, sampling, is_long):
            await asyncio.sleep(max(0.0, start + arrival - time.monotonic()))
            return await measure(client, prompt, sampling, is_long)

        return await asyncio.gather(*(at(*item) for item in workload))


def summarise(samples: list[Sample]) -> dict:
    short = [s for s in samples if not s.long]
    return {"ttft_all": percentiles([s.ttft_s for s in samples]),
            "ttft_short": percentiles([s.ttft_s for s in short]),
            "ttft_long": percentiles([s.ttft_s for s in samples if s.long]),
            "tpot": percentiles([s.tpot_s for s in samples if s.tokens > 1])}


# ---- layer-wise streaming --------------------------------------------------------------------------------------
async def token_times(client: Client, prompt: Prompt, sampling: SamplingParams) -> list[float]:
    """Seconds from the request to each token's arrival at the client."""
    start, times = time.monotonic(), []
    async for response in client.stream(prompt, sampling):
        times += [time.monotonic() - start] * len(response.token_ids)
    return times


async def layerwise_run(address: str, prompts: list[Prompt]) -> dict:
    sampling = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    async with Client(address, timeout_s=600) as client:
        await token_times(client, prompts[0], sampling)  # warm-up
        runs = [await token_times(client, p, sampling) for p in prompts]
    return {"ttft": [t[0] for t in runs], "second_token": [t[1] for t in runs], "gap": [t[1] - t[0] for t in runs]}


def layerwise_prompts(count: int = 12, seed: int = 1) -> list[Prompt]:
    rng = random.Random(seed)
    return [Prompt(token_ids=tuple(rng.randrange(1000, 40000) for _ in range(rng.randint(1000, 2000))))
            for _ in range(count)]


LAYERWISE = {"after the prefill": {"backend": "gloo", "layerwise": False},
             "streamed": {"backend": "gloo", "layerwise": True}}
BACKENDS = {"gloo": {"backend": "gloo"}, "ipc": {"backend": "auto"}}


def layerwise_report(prompts: list[Prompt], variants: dict[str, dict], rounds: int = 2) -> dict:
    """Each `variants` entry (a `kv_transfer:` section) on a cluster of its own, in turn, `rounds` times."""
    found: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    for _ in range(rounds):
        for name, kv_transfer in variants.items():
            config = {**DISAGGREGATED, "kv_transfer": kv_transfer}
            run = with_cluster(config, lambda address: layerwise_run(address, prompts))
            for metric, values in run.items():
                found[name].setdefault(metric, []).extend(values)
    return {name: {metric: percentiles(values) for metric, values in metrics.items()}
            for name, metrics in found.items()}


# ---- driver ----------------------------------------------------------------------------------------------------
def with_cluster(config: dict, body):
    with tempfile.TemporaryDirectory() as state:
        cluster = start_cluster(state, config)
        try:
            return asyncio.run(body(cluster.address))
        finally:
            stop_cluster(cluster)


def print_table(title: str, rows: dict[str, dict[str, dict[str, float]]]) -> None:
    print(f"\n{title}")
    for row, metrics in rows.items():
        for metric, values in metrics.items():
            cells = "  ".join(f"{k} {v * 1000:8.1f} ms" for k, v in values.items())
            print(f"  {row:<16} {metric:<30} {cells}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.bench.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["overhead", "mixed", "layerwise", "handoff"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rate", type=float, default=0.8, help="mixed: arrivals per second")
    parser.add_argument("--slo-ttft", type=float, default=10.0, help="mixed: TTFT SLO for attainment (s)")
    parser.add_argument("--slo-tpot", type=float, default=0.35, help="mixed: the tight TPOT SLO (s)")
    args = parser.parse_args(argv)
    if args.which == "overhead":
        report = {"disaggregated": with_cluster(DISAGGREGATED, overhead_run)}
        flat = {f"{k}": v for k, v in report["disaggregated"].items()}
        print_table("router + Ray overhead (1 prefill + 1 decode, SmolLM2, CPU)", flat)
    elif args.which == "layerwise":
        report = layerwise_report(layerwise_prompts(), LAYERWISE)
        print_table("KV handoff after the prefill vs streamed layer by layer (1P + 1D, 1-2k-token prompts)", report)
    elif args.which == "handoff":
        report = layerwise_report(layerwise_prompts(), BACKENDS)
        print_table("KV handoff over gloo vs IPC (1P + 1D on one machine, 1-2k-token prompts)", report)
    else:
        workload = mixed_workload(rate=args.rate)
        report, met = {}, {}
        for name, config in (("disaggregated", DISAGGREGATED), ("colocated", COLOCATED)):
            samples = with_cluster(config, lambda address: mixed_run(address, workload))
            report[name] = summarise(samples)
            met[name] = sum(s.ttft_s <= args.slo_ttft and (s.tokens <= 1 or s.tpot_s <= args.slo_tpot)
                            for s in samples) / len(samples)
        print_table(f"mixed workload: 36 chats + 4 long prompts, Poisson {args.rate}/s, same total cores", report)
        for name, share in met.items():
            print(f"  {name:<16} SLO attainment (TTFT <= {args.slo_ttft} s, TPOT <= {args.slo_tpot} s): {share:.1%}")
        report["attainment"] = met
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
