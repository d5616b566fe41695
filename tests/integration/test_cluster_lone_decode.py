"""The default shape, one prefill and one decode worker (real redis-server, Ray, SmolLM2, KV over gloo, gRPC on
127.0.0.1): the only decode worker is SIGKILLed while eight streams decode. No other decode worker exists, so each
request waits for the pool's replacement (router.worker_wait_s, 30 s) and is resumed on it (its prompt and tokens so
far prefilled again): every stream completes identical to a fault-free run, in token ids and in text, greedy and
seeded, and afterwards no KV block is held.
(Issue 18's probe: with a fixed 10 s wait, streams that already had 83-86 tokens were cut with UNAVAILABLE.)
The decode workers speculate with a draft model (the model with int4 layers, reading the KV the prefill worker sent):
the greedy streams' tokens are the local engine's all the same, through the kill and the resumption.

Then the (replacement) decode worker is stopped with SIGSTOP: alive to Ray, answering nothing. The control plane
finds it hung after `workers.hung_after_s` (6 s here), kills it and starts another, and the streams resume on that
one (the probe: a SIGSTOPped decode worker held its streams for 46 s).

Then Redis is stopped (SIGSTOP) for 10 s mid-stream: no stream stalls and /health answers at once.

Last, Redis is killed and stays down while the decode worker is SIGKILLed: its replacement joins through Ray (the
router and the prefill worker ask the worker actors themselves while the registry is away), new streams are served
by it, and once Redis is back the registry fills in again (the probe: a replacement started while Redis was down
never served, and the cluster stayed unhealthy for minutes)."""

import asyncio
import os
import signal
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.client import Client
from pdserve.engine import Prompt, SamplingParams

from .conftest import cluster_with_spare_redis

pytestmark = pytest.mark.model

CONFIG = {"engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 256,
                     "speculative": {"method": "draft", "k": 3, "max_batch": 8, "adaptive": False}},
          "kv_transfer": {"checksums": True},
          "workers": {"hung_after_s": 6, "prefill": {"count": 1, "resources": {"cpus": 1}},
                      "decode": {"count": 1, "resources": {"cpus": 1}}}}
SAMPLINGS = [SamplingParams(max_tokens=60, temperature=0, ignore_eos=True) if i % 2 == 0 else
             SamplingParams(max_tokens=60, temperature=0.8, top_p=0.95, seed=100 + i, ignore_eos=True)
             for i in range(8)]
"""Greedy and seeded in turn: a resumed request's tokens and text equal the uninterrupted run's either way."""
PROMPTS = [Prompt(text=f"Chapter {i}: the lighthouse keeper looked at the sea and") for i in range(8)]
KILL_AFTER_TOKENS = 10
RUN_DEADLINE_S = 300


@pytest.fixture(scope="module")
def cluster_and_redis(tmp_path_factory):
    with cluster_with_spare_redis(str(tmp_path_factory.mktemp("lone-decode")), CONFIG) as both:
        yield both


@pytest.fixture
def cluster(cluster_and_redis):
    return cluster_and_redis[0]


def test_the_only_decode_worker_killed_mid_stream_loses_no_request(cluster, expected):
    decode_id, decode = next((i, w) for i, w in cluster.workers().items() if w["role"] == "decode")
    outputs = run_streams(cluster, lambda: os.kill(decode["pid"], signal.SIGKILL), "killed")
    assert outputs == expected
    assert cluster.router_metric("pdserve_request_migrations_total") >= len(PROMPTS)
    assert_replaced_and_idle(cluster, decode_id)
    assert decode_counter(cluster, "pdserve_worker_speculative_accepted_tokens_total") > 0  # the replacement drafted


def decode_counter(cluster, name: str) -> float:
    """A decode worker metric's value, summed over the decode workers (the router's /metrics/workers)."""
    url = cluster.http_url.removesuffix("/v1") + "/metrics/workers"
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and s.labels.get("role") == "decode")


def test_a_stopped_decode_worker_is_found_hung_killed_and_replaced(cluster, expected):
    decode_id, decode = next((i, w) for i, w in cluster.workers().items() if w["role"] == "decode")
    migrations_before = cluster.router_metric("pdserve_request_migrations_total")
    stopped_at: list[float] = []

    def stop() -> None:
        os.kill(decode["pid"], signal.SIGSTOP)
        stopped_at.append(time.monotonic())

    try:
        outputs = run_streams(cluster, stop, "stopped")
        resumed_after_s = time.monotonic() - stopped_at[0]
        assert outputs == expected
        assert cluster.router_metric("pdserve_request_migrations_total") >= migrations_before + len(PROMPTS)
        assert_replaced_and_idle(cluster, decode_id)
        assert not _alive(decode["pid"]), "the hung worker's process was not killed"
        print(f"streams done {resumed_after_s:.1f} s after the SIGSTOP")
    finally:
        if _alive(decode["pid"]):
            os.kill(decode["pid"], signal.SIGKILL)


def test_a_hung_redis_stalls_neither_streams_nor_health(cluster, expected):
    """Redis stopped (SIGSTOP) for 10 s mid-stream, twice its clients' socket timeout (the probe: /health took 14 s
    and every stream stalled 14 s, the router's Redis calls being on its event loop)."""
    redis_pid = cluster.state()["redis_pid"]
    health_url = cluster.http_url.removesuffix("/v1") + "/health"
    health_s: list[float] = []

    def hang_redis() -> None:
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            for _ in range(5):
                began = time.monotonic()
                urllib.request.urlopen(health_url, timeout=30).read()
                health_s.append(time.monotonic() - began)
                time.sleep(2.0)
        finally:
            os.kill(redis_pid, signal.SIGCONT)

    gaps: list[float] = []
    outputs = run_streams(cluster, lambda: asyncio.get_running_loop().run_in_executor(None, hang_redis),
                          "redis-hung", gaps)
    assert outputs == expected
    assert len(health_s) == 5 and max(health_s) < 2.0, health_s
    assert max(gaps) < 4.0, max(gaps)
    assert_replaced_and_idle(cluster, "none")
    print(f"Redis hung 10 s: /health answered in at most {max(health_s):.2f} s, longest gap between tokens "
          f"{max(gaps):.2f} s")


def test_a_decode_worker_replaced_while_redis_is_down_serves_at_once(cluster_and_redis, expected):
    cluster, start_empty_redis = cluster_and_redis
    decode_id, decode = next((i, w) for i, w in cluster.workers().items() if w["role"] == "decode")
    state = cluster.state()
    os.kill(state["redis_pid"], signal.SIGKILL)
    time.sleep(1.5)  # routers and workers have seen Redis go
    os.kill(decode["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    outputs = run_streams(cluster, lambda: None, "redis-down")
    served_after_s = time.monotonic() - killed_at
    assert outputs == expected
    start_empty_redis()
    assert_replaced_and_idle(cluster, decode_id)
    print(f"8 new streams served {served_after_s:.1f} s after the kill, with Redis down")


@pytest.fixture(scope="module")
def expected(engine) -> list[tuple[tuple[int, ...], str]]:
    """Every prompt's tokens and text from the local engine, uninterrupted (the same for each test: made once)."""
    return [(tuple(r.token_ids), r.text) for r in engine.generate(PROMPTS, SAMPLINGS)]


def run_streams(cluster, fault, label: str, gaps: list[float] | None = None) -> list[tuple[tuple[int, ...], str]]:
    """Stream every prompt (request ids `<label>-<i>`); `fault()` once each stream has KILL_AFTER_TOKENS tokens.
    `gaps`: filled with the time between consecutive responses of every stream."""
    progress = [0] * len(PROMPTS)
    gaps = [] if gaps is None else gaps

    async def stream(client: Client, index: int) -> tuple[tuple[int, ...], str]:
        tokens: list[int] = []
        text = ""
        last = None
        async for response in client.stream(PROMPTS[index], SAMPLINGS[index], f"{label}-{index}"):
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now
            tokens += response.token_ids
            text += response.text
            progress[index] = len(tokens)
        return tuple(tokens), text

    async def fault_when_all_decode() -> None:
        while min(progress) < KILL_AFTER_TOKENS:
            await asyncio.sleep(0.02)
        done = fault()
        if done is not None:  # a fault that runs alongside the streams
            await done

    async def go():
        async with Client(cluster.address, timeout_s=RUN_DEADLINE_S) as client:
            _, *outputs = await asyncio.wait_for(asyncio.gather(
                fault_when_all_decode(), *(stream(client, i) for i in range(len(PROMPTS)))), RUN_DEADLINE_S)
        return outputs

    return asyncio.run(go())


def assert_replaced_and_idle(cluster, decode_id: str) -> None:
    workers = cluster.wait_until_idle(timeout_s=30)
    assert decode_id not in workers and sorted(w["role"] for w in workers.values()) == ["decode", "prefill"]
    assert all(w["used"] == 0 and w["running"] == 0 for w in workers.values()), workers


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
