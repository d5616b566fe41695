"""The multi-turn workload: conversations whose every turn sends the whole history again, the shape prefix caching
is for (`pdserve bench --workload multiturn`).

Each conversation starts from one system prompt shared by all (`system_tokens` long), then for each turn adds a new
user message (`message_tokens`) and sends the whole history: system prompt, every earlier message and every earlier
reply, as the model produced it (token ids over gRPC, greedy), then waits for the reply before its next turn.
`concurrency` conversations run at once. Token ids are random (seeded), from [1000, vocab_size).

What it reports, side by side across cluster settings (`bench.prefix_caching`):
- at the client: TTFT p50/p90 of every turn, and of the turns after the first;
- from the router's usage: prompt tokens sent and those served from a prefix cache (`Timings.cached_tokens`);
- from the workers' metrics (/metrics/workers, before and after): prompt tokens the prefill workers computed, KV
  bytes the handoffs moved and those not sent because the decode worker held them, and the prefill workers'
  prefix-cache hit rate.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from pdserve.bench.metrics import percentiles
from pdserve.bench.workloads import FIRST_TOKEN_ID
from pdserve.client import Client
from pdserve.engine import Prompt, SamplingParams

WORKER_COUNTERS = {
    "prefill_tokens": "pdserve_worker_prefill_tokens_total",
    "kv_bytes_moved": "pdserve_worker_kv_transfer_bytes_total",
    "kv_bytes_not_sent": "pdserve_worker_kv_bytes_not_sent_total",
    "cache_queried": "pdserve_worker_prefix_cache_queried_tokens_total",
    "cache_hits": "pdserve_worker_prefix_cache_hit_tokens_total",
}
"""What is read off the prefill workers' metrics (name in the report -> Prometheus sample)."""


@dataclass(frozen=True)
class MultiturnSpec:
    conversations: int = 8
    turns: int = 4
    system_tokens: int = 1024
    message_tokens: int = 64
    output_tokens: int = 32
    concurrency: int = 4
    """Conversations in flight at once."""
    vocab_size: int = 32000
    seed: int = 0
    timeout_s: float = 300.0
    """Per turn."""

    def __post_init__(self) -> None:
        for name in ("conversations", "turns", "message_tokens", "output_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.system_tokens < 0 or self.vocab_size <= FIRST_TOKEN_ID:
            raise ValueError(f"system_tokens must be >= 0 and vocab_size > {FIRST_TOKEN_ID}")


@dataclass(frozen=True)
class Turn:
    conversation: int
    turn: int
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    e2e_s: float


@dataclass(frozen=True)
class MultiturnReport:
    turns: tuple[Turn, ...]
    wall_s: float
    workers: dict[str, float]
    """The `WORKER_COUNTERS` deltas over the run, summed over the prefill workers (kv_bytes_moved: what they
    sent)."""

    def summary(self) -> dict[str, float]:
        later = [t for t in self.turns if t.turn > 0]
        ttft, ttft_later = percentiles(t.ttft_s for t in self.turns), percentiles(t.ttft_s for t in later)
        w = self.workers
        return {"turns": len(self.turns), "ttft_p50_s": ttft["p50"], "ttft_p90_s": ttft["p90"],
                "later_ttft_p50_s": ttft_later["p50"], "later_ttft_p90_s": ttft_later["p90"],
                "prompt_tokens": sum(t.prompt_tokens for t in self.turns),
                "cached_tokens": sum(t.cached_tokens for t in self.turns),
                "prefill_tokens_computed": w.get("prefill_tokens", 0.0),
                "kv_bytes_moved": w.get("kv_bytes_moved", 0.0), "kv_bytes_not_sent": w.get("kv_bytes_not_sent", 0.0),
                "hit_rate": w["cache_hits"] / w["cache_queried"] if w.get("cache_queried") else 0.0,
                "wall_s": self.wall_s}


def run_multiturn(router: str, spec: MultiturnSpec, worker_metrics_url: str | None = None) -> MultiturnReport:
    """Run the conversations against the router at `router` (gRPC host:port); `worker_metrics_url`: the router's
    /metrics/workers, read before and after."""
    before = prefill_counters(worker_metrics_url) if worker_metrics_url else {}
    started = time.monotonic()
    turns = asyncio.run(_conversations(router, spec))
    wall = time.monotonic() - started
    after = prefill_counters(worker_metrics_url) if worker_metrics_url else {}
    return MultiturnReport(tuple(turns), wall, {k: after[k] - before.get(k, 0.0) for k in after})


def prefill_counters(url: str) -> dict[str, float]:
    """`WORKER_COUNTERS` summed over the prefill workers, from the router's /metrics/workers."""
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    totals = dict.fromkeys(WORKER_COUNTERS, 0.0)
    wanted = {sample: name for name, sample in WORKER_COUNTERS.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("role") == "prefill":
                totals[wanted[sample.name]] += sample.value
    return totals


async def _conversations(router: str, spec: MultiturnSpec) -> list[Turn]:
    system = _tokens(spec, [spec.seed, 1 << 40], spec.system_tokens)
    gate = asyncio.Semaphore(spec.concurrency)
    turns: list[Turn] = []
    async with Client(router, timeout_s=spec.timeout_s) as client:
        async def conversation(index: int) -> None:
            async with gate:
                history = list(system)
                for turn in range(spec.turns):
                    history += _tokens(spec, [spec.seed, index, turn], spec.message_tokens)
                    reply, record = await _turn(client, spec, index, turn, history)
                    turns.append(record)
                    history += reply

        await asyncio.gather(*(conversation(i) for i in range(spec.conversations)))
    return sorted(turns, key=lambda t: (t.conversation, t.turn))


async def _turn(client: Client, spec: MultiturnSpec, index: int, turn: int,
                history: list[int]) -> tuple[list[int], Turn]:
    sampling = SamplingParams(max_tokens=spec.output_tokens, temperature=0, ignore_eos=True)
    sent = time.monotonic()
    first = None
    reply: list[int] = []
    cached = 0
    async for response in client.stream(Prompt(token_ids=tuple(history)), sampling,
                                        f"conv{index}-turn{turn}-{spec.seed}"):
        if response.token_ids and first is None:
            first = time.monotonic()
        reply += response.token_ids
        if response.HasField("timings"):
            cached = response.timings.cached_tokens
    end = time.monotonic()
    return reply, Turn(index, turn, len(history), cached, (first or end) - sent, end - sent)


def _tokens(spec: MultiturnSpec, seed: list[int], count: int) -> list[int]:
    return np.random.default_rng(seed).integers(FIRST_TOKEN_ID, spec.vocab_size, size=count).tolist()
