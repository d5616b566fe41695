"""The default shape, one prefill and one decode worker (real redis-server, Ray, SmolLM2, KV over gloo, gRPC on
127.0.0.1): the only decode worker is SIGKILLed while eight streams decode. No other decode worker exists, so each
request waits for the pool's replacement (router.worker_wait_s, 30 s) and is resumed on it (its prompt and tokens so
far prefilled again): every stream completes token-identical to a fault-free run, and afterwards no KV block is held.
(Issue 18's probe: with a fixed 10 s wait, streams that already had 83-86 tokens were cut with UNAVAILABLE.)"""

import asyncio
import os
import signal

import pytest

from pdserve.bench.local_cluster import start_cluster, stop_cluster
from pdserve.client import Client
from pdserve.engine import Prompt, SamplingParams

pytestmark = pytest.mark.model

CONFIG = {"engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 256},
          "workers": {"prefill": {"count": 1, "resources": {"cpus": 1}},
                      "decode": {"count": 1, "resources": {"cpus": 1}}}}
SAMPLING = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
PROMPTS = [Prompt(text=f"Chapter {i}: the lighthouse keeper looked at the sea and") for i in range(8)]
KILL_AFTER_TOKENS = 10
RUN_DEADLINE_S = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = start_cluster(str(tmp_path_factory.mktemp("lone-decode")), CONFIG)
    yield running
    stop_cluster(running)


def test_the_only_decode_worker_killed_mid_stream_loses_no_request(cluster, engine):
    expected = [r.token_ids for r in engine.generate(PROMPTS, SAMPLING)]
    decode_id, decode = next((i, w) for i, w in cluster.workers().items() if w["role"] == "decode")
    progress = [0] * len(PROMPTS)

    async def stream(client: Client, index: int) -> list[int]:
        tokens: list[int] = []
        async for response in client.stream(PROMPTS[index], SAMPLING, f"lone-{index}"):
            tokens += response.token_ids
            progress[index] = len(tokens)
        return tokens

    async def kill_when_all_decode() -> None:
        while min(progress) < KILL_AFTER_TOKENS:
            await asyncio.sleep(0.02)
        os.kill(decode["pid"], signal.SIGKILL)

    async def go():
        async with Client(cluster.address, timeout_s=RUN_DEADLINE_S) as client:
            _, *outputs = await asyncio.wait_for(asyncio.gather(
                kill_when_all_decode(), *(stream(client, i) for i in range(len(PROMPTS)))), RUN_DEADLINE_S)
        return outputs

    outputs = asyncio.run(go())
    assert [tuple(o) for o in outputs] == [tuple(e) for e in expected]
    assert cluster.router_metric("pdserve_request_migrations_total") >= len(PROMPTS)
    workers = cluster.wait_until_idle(timeout_s=30)
    assert decode_id not in workers and sorted(w["role"] for w in workers.values()) == ["decode", "prefill"]
    assert all(w["used"] == 0 and w["running"] == 0 for w in workers.values()), workers
