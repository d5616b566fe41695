"""Faults on a live cluster (real redis-server, Ray, SmolLM2, KV over gloo, gRPC on 127.0.0.1).

Workers: 200 greedy requests stream from 32 concurrent clients while a decode worker and then a prefill worker are
killed (SIGKILL). Every request finishes, token-identical to the local engine (itself checked against transformers):
the router resumed the failed workers' requests elsewhere (prompt plus the tokens already sent, prefilled again),
the pool replaced the dead workers, and afterwards no KV block is in use anywhere.

Redis: killed mid-stream and restarted empty on its port; requests already accepted finish, and the registry fills
again from the workers' heartbeats.
"""

import asyncio
import os
import signal
import time

import pytest

from pdserve.client import Client
from pdserve.engine import SamplingParams

from .conftest import cluster_with_spare_redis
from .test_smollm2_oracle import PROMPTS as ALL_PROMPTS

PROMPTS = [p for p in ALL_PROMPTS if p.messages is None or len(p.messages[0].content) < 1000]
"""The oracle prompts but the 700-token one: chunked prefill is tested elsewhere, and here it would only slow the
200 requests down."""

pytestmark = pytest.mark.model

CONFIG = {"engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 256}, "kv_transfer": {"checksums": True},
          "workers": {"prefill": {"count": 2, "resources": {"cpus": 0.5}},
                      "decode": {"count": 2, "resources": {"cpus": 0.5}}}}
REQUESTS = 200
CLIENTS = 32
SAMPLING = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
RUN_DEADLINE_S = 600


@pytest.fixture(scope="module")
def cluster_and_redis(tmp_path_factory):
    with cluster_with_spare_redis(str(tmp_path_factory.mktemp("chaos")), CONFIG) as both:
        yield both


@pytest.fixture
def cluster(cluster_and_redis):
    return cluster_and_redis[0]


def kill_one(cluster, role: str) -> str:
    worker_id, worker = next((i, w) for i, w in sorted(cluster.workers().items()) if w["role"] == role)
    os.kill(worker["pid"], signal.SIGKILL)
    return worker_id


def test_killing_a_decode_then_a_prefill_worker_loses_no_request(cluster, engine):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(REQUESTS)]
    expected = {i: r.token_ids for i, r in enumerate(engine.generate(PROMPTS, SAMPLING))}
    done: dict[int, object] = {}
    killed: list[str] = []

    async def client(todo: asyncio.Queue) -> None:
        async with Client(cluster.address, timeout_s=RUN_DEADLINE_S) as c:
            while not todo.empty():
                i = todo.get_nowait()
                done[i] = await c.generate(prompts[i], SAMPLING)

    async def chaos() -> None:
        for role, after in (("decode", 30), ("prefill", 100)):
            while len(done) < after:
                await asyncio.sleep(0.05)
            killed.append(await asyncio.to_thread(kill_one, cluster, role))

    async def go() -> None:
        todo: asyncio.Queue = asyncio.Queue()
        for i in range(REQUESTS):
            todo.put_nowait(i)
        await asyncio.wait_for(asyncio.gather(chaos(), *(client(todo) for _ in range(CLIENTS))), RUN_DEADLINE_S)

    asyncio.run(go())
    assert len(killed) == 2 and len(done) == REQUESTS
    wrong = [i for i in range(REQUESTS) if done[i].token_ids != expected[i % len(PROMPTS)]]
    assert not wrong, f"{len(wrong)} outputs differ from the fault-free run, e.g. request {wrong[0]}"
    assert len({r.request_id for r in done.values()}) == REQUESTS
    assert cluster.router_metric("pdserve_request_migrations_total") >= 1

    deadline = time.monotonic() + 120  # the pool replaces both dead workers
    while True:
        workers = cluster.wait_until_idle(timeout_s=30)
        if sorted(w["role"] for w in workers.values()) == ["decode", "decode", "prefill", "prefill"]:
            break
        assert time.monotonic() < deadline, f"dead workers not replaced: {workers}"
        time.sleep(1.0)
    assert not set(killed) & set(workers)
    assert all(w["used"] == 0 and w["running"] == 0 for w in workers.values()), workers


def restart_redis_empty(cluster, start_empty_redis) -> None:
    """SIGKILL the cluster's redis-server and start an empty one on its port."""
    os.kill(cluster.state()["redis_pid"], signal.SIGKILL)
    time.sleep(1.0)  # a heartbeat or two fails meanwhile
    start_empty_redis()


REDIS_SAMPLING = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def test_redis_restart_loses_no_accepted_request(cluster_and_redis, engine):
    """Redis is killed once every stream has its first tokens and none has finished: all 12 are in flight; an
    empty one starts on its port a second later."""
    cluster, start_empty_redis = cluster_and_redis
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    expected = [r.token_ids for r in engine.generate(prompts, REDIS_SAMPLING)]
    progress = [0] * len(prompts)
    in_flight_at_restart = []

    async def stream(client: Client, index: int) -> list[int]:
        tokens: list[int] = []
        async for response in client.stream(prompts[index], REDIS_SAMPLING, f"redis-{index}"):
            tokens += response.token_ids
            progress[index] = len(tokens)
        return tokens

    async def restart_when_all_stream() -> None:
        while min(progress) < 2:
            await asyncio.sleep(0.02)
        in_flight_at_restart.append(sum(1 for p in progress if p < REDIS_SAMPLING.max_tokens))
        await asyncio.to_thread(restart_redis_empty, cluster, start_empty_redis)

    async def go():
        async with Client(cluster.address, timeout_s=RUN_DEADLINE_S) as c:
            _, *outputs = await asyncio.gather(restart_when_all_stream(),
                                               *(stream(c, i) for i in range(len(prompts))))
            return outputs

    outputs = asyncio.run(go())
    assert in_flight_at_restart == [len(prompts)]
    assert [tuple(o) for o in outputs] == [tuple(e) for e in expected]
    workers = cluster.wait_until_idle(timeout_s=30)  # the registry is back, from heartbeats
    assert sorted(w["role"] for w in workers.values()) == ["decode", "decode", "prefill", "prefill"]
    assert all(w["used"] == 0 for w in workers.values())
    after = asyncio.run(_one(cluster))  # and new requests are served
    assert after.token_ids == engine.generate(PROMPTS[:1], SAMPLING)[0].token_ids


async def _one(cluster):
    async with Client(cluster.address, timeout_s=120) as c:
        return await c.generate(PROMPTS[0], SAMPLING)
