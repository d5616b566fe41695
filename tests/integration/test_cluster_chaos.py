"""Worker failures on a live cluster (real redis-server, Ray, SmolLM2, KV over gloo, gRPC on 127.0.0.1): 200 greedy
requests stream from 32 concurrent clients while a decode worker and then a prefill worker are killed (SIGKILL).

Every request finishes, token-identical to the local engine (itself checked against transformers): the router
resumed the failed workers' requests elsewhere (prompt plus the tokens already sent, prefilled again), the pool
replaced the dead workers, and afterwards no KV block is in use anywhere.
"""

import asyncio
import os
import signal
import time
import urllib.request

import pytest

from pdserve.client import Client
from pdserve.cluster.local_cluster import start_cluster, stop_cluster
from pdserve.engine import SamplingParams

from .test_smollm2_oracle import PROMPTS

pytestmark = pytest.mark.model

CONFIG = {"engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 256},
          "workers": {"prefill": {"count": 2, "resources": {"cpus": 0.5}},
                      "decode": {"count": 2, "resources": {"cpus": 0.5}}}}
REQUESTS = 200
CLIENTS = 32
SAMPLING = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
RUN_DEADLINE_S = 600


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = start_cluster(str(tmp_path_factory.mktemp("chaos")), CONFIG)
    yield running
    stop_cluster(running)


def kill_one(cluster, role: str) -> str:
    worker_id, worker = next((i, w) for i, w in sorted(cluster.workers().items()) if w["role"] == role)
    os.kill(worker["pid"], signal.SIGKILL)
    return worker_id


def router_counter(cluster, name: str) -> float:
    text = urllib.request.urlopen(f"http://{cluster.state()['metrics_address']}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


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
    assert router_counter(cluster, "pdserve_request_migrations_total") >= 1

    deadline = time.monotonic() + 120  # the pool replaces both dead workers
    while True:
        workers = cluster.wait_until_idle(timeout_s=30)
        if sorted(w["role"] for w in workers.values()) == ["decode", "decode", "prefill", "prefill"]:
            break
        assert time.monotonic() < deadline, f"dead workers not replaced: {workers}"
        time.sleep(1.0)
    assert not set(killed) & set(workers)
    assert all(w["used"] == 0 and w["running"] == 0 for w in workers.values()), workers
