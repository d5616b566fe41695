"""Online SLO attainment with and without a Batch API job running beside it, side by side on one cluster.

    python -m pdserve.bench.batch_beside_online [--batch 2000] [--rate 6] [--duration 240] [--engine sim]

One cluster (1 prefill + 1 decode worker; `--engine sim`: a simulated Llama-3-8B on H100s, the real schedulers,
router and KV handoffs with modelled step times; `--engine smollm2`: the real model on this machine's CPUs) serves
the same online trace (open loop, Poisson) twice: alone, then with a batch of `--batch` requests submitted through
the Batch API a few seconds in (low priority: the router lets them through only into spare capacity, the engines
serve online requests first and preempt batch ones first). Printed: online attainment against the SLO in each run,
the difference in points, and when the batch completed (it must, within the run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass

import httpx

from pdserve.bench.load_generator import LoadConfig, LoadGenerator
from pdserve.bench.local_cluster import RunningCluster, start_cluster, stop_cluster
from pdserve.bench.metrics import SLO, summarize
from pdserve.bench.workloads import LengthDist, Workload, make_trace

TIME_SCALE = 4.0
"""The sim engine runs 4x slower than modelled, so the router (on this machine's CPUs) keeps up with a load that
fills a modelled H100; the SLOs are scaled alike (1 s TTFT and 50 ms TPOT modelled)."""
ENGINES = {
    "sim": {"backend": "sim", "model": "llama-3-8b", "sim": {"hardware": "h100", "time_scale": TIME_SCALE}},
    "smollm2": {"num_kv_blocks": 2048, "max_num_batched_tokens": 256},
}
SLOS = {"sim": SLO(ttft_s=1.0 * TIME_SCALE, tpot_s=0.05 * TIME_SCALE), "smollm2": SLO(ttft_s=3.0, tpot_s=0.5)}
VOCAB = {"sim": 128_000, "smollm2": 49_152}
ONLINE = Workload("online", LengthDist(300, 0.8, 16, 2048), LengthDist(120, 0.6, 8, 512), "chat-like")
BATCH_INPUT_TOKENS = 128
BATCH_OUTPUT_TOKENS = 16
SUBMIT_AT_S = 5.0


@dataclass(frozen=True)
class RunReport:
    attainment: float
    requests: int
    failed: int
    ttft_p90_s: float
    tpot_p90_s: float
    batch_completed_s: float | None
    """Seconds from the batch's submission to its status `completed` (None: it did not finish in the run)."""
    batch_counts: dict | None


def batch_file(count: int, seed: int, priority: int | None) -> bytes:
    """`count` completions of token-id prompts (no tokenizer needed), `BATCH_OUTPUT_TOKENS` each, greedy; each line
    with `priority` when given (else the Batch API's own, low)."""
    rows = []
    for i in range(count):
        prompt = [1000 + (seed * 7919 + i * 104729 + k * 31) % 30000 for k in range(BATCH_INPUT_TOKENS)]
        body = {"prompt": prompt, "max_tokens": BATCH_OUTPUT_TOKENS, "temperature": 0, "ignore_eos": True}
        if priority is not None:
            body["priority"] = priority
        rows.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body})
    return "\n".join(json.dumps(r) for r in rows).encode()


async def run_batch(base_url: str, count: int, seed: int, deadline: float,
                    priority: int | None) -> tuple[float | None, dict | None]:
    """Submit the batch after SUBMIT_AT_S, then poll until it completes or the deadline passes."""
    await asyncio.sleep(SUBMIT_AT_S)
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        uploaded = await client.post("/files", files={"file": ("batch.jsonl", batch_file(count, seed, priority))},
                                     data={"purpose": "batch"})
        uploaded.raise_for_status()
        created = await client.post("/batches", json={"input_file_id": uploaded.json()["id"],
                                                      "endpoint": "/v1/completions", "completion_window": "24h"})
        created.raise_for_status()
        batch_id, began = created.json()["id"], time.monotonic()
        batch = created.json()
        while time.monotonic() < deadline:
            batch = (await client.get(f"/batches/{batch_id}")).json()
            if batch["status"] == "completed":
                return time.monotonic() - began, batch["request_counts"]
            await asyncio.sleep(1.0)
        return None, batch["request_counts"]


async def one_run(cluster: RunningCluster, engine: str, rate: float, duration_s: float, batch: int,
                  seed: int, priority: int | None = None) -> RunReport:
    trace = make_trace(ONLINE, rate, duration_s=duration_s, seed=seed, max_input_tokens=2048,
                       max_output_tokens=512)
    load = LoadGenerator(LoadConfig(cluster.address, vocab_size=VOCAB[engine], seed=seed, progress=False,
                                    deadline_s=duration_s + 120))
    deadline = time.monotonic() + duration_s + 60
    batch_task = asyncio.create_task(run_batch(cluster.http_url, batch, seed, deadline, priority)) if batch else None
    result = await load.run_async(trace)
    completed_s, counts = await batch_task if batch_task else (None, None)
    summary = summarize(result.records, SLOS[engine], result.duration_s)
    return RunReport(summary.attainment, summary.requests, summary.failed, summary.ttft_s.get("p90", float("nan")),
                     summary.tpot_s.get("p90", float("nan")), completed_s, counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=list(ENGINES), default="sim")
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=6.0, help="online requests per second")
    parser.add_argument("--duration", type=float, default=240.0, help="seconds of online traffic per run")
    parser.add_argument("--low-priority-limit", type=int, default=32, help="router.low_priority_limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--also-online-priority", action="store_true",
                        help="a third run: the same batch with priority 0, as online traffic (no gate)")
    args = parser.parse_args()
    config = {"engine": ENGINES[args.engine], "router": {"low_priority_limit": args.low_priority_limit},
              "workers": {"prefill": {"count": 1, "resources": {"cpus": 0.5}},
                          "decode": {"count": 1, "resources": {"cpus": 0.5}}}}
    reports = {}
    with tempfile.TemporaryDirectory(prefix="pdserve-batch-bench-") as state_dir:
        cluster = start_cluster(state_dir, config)
        try:
            runs = [("online alone", 0, None), (f"online + batch of {args.batch}", args.batch, None)]
            if args.also_online_priority:
                runs.append((f"online + batch of {args.batch} at priority 0", args.batch, 0))
            for name, batch, priority in runs:
                reports[name] = asyncio.run(one_run(cluster, args.engine, args.rate, args.duration, batch,
                                                    args.seed, priority))
        finally:
            stop_cluster(cluster)
    slo = SLOS[args.engine]
    print(f"engine {args.engine}, online {args.rate}/s for {args.duration:g} s, SLO ttft {slo.ttft_s} s tpot "
          f"{slo.tpot_s} s, router.low_priority_limit {args.low_priority_limit}")
    print("| run | online attainment | online requests (failed) | TTFT p90 | TPOT p90 | batch completed after |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in reports.items():
        done = "-" if r.batch_counts is None else (
            f"{r.batch_completed_s:.0f} s" if r.batch_completed_s is not None else f"not done: {r.batch_counts}")
        print(f"| {name} | {r.attainment:.1%} | {r.requests} ({r.failed}) | {r.ttft_p90_s:.3f} s | "
              f"{r.tpot_p90_s:.3f} s | {done} |")
    alone, *others = reports.values()
    for name, r in list(reports.items())[1:]:
        print(f"{name}: {(r.attainment - alone.attainment) * 100:+.1f} points against online alone")


if __name__ == "__main__":
    main()
