"""The ratio controller on a live cluster (real redis-server, Ray, SmolLM2, gRPC on 127.0.0.1): an operator pin moves
a worker to the other role while requests stream, and every request completes, token-identical to the local engine.
Both pools ask for the same resources, so the worker switches roles in place (same actor process, same engine).
The moving decode worker hands on what it still decodes half a second into its drain, so the move also runs the
hand-on path: those requests resume on the other decode worker, their tokens so far prefilled again.
"""

import asyncio
import json
import time

import pytest

from pdserve.bench.local_cluster import start_cluster, stop_cluster
from pdserve.client import Client
from pdserve.engine import SamplingParams
from pdserve.registry.registry import Registry

from .test_smollm2_oracle import PROMPTS

pytestmark = pytest.mark.model

CONFIG = {"engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 256},
          "workers": {"prefill": {"count": 1, "resources": {"cpus": 0.5}},
                      "decode": {"count": 2, "resources": {"cpus": 0.5}}},
          "controller": {"enabled": True, "interval_s": 1.0, "cooldown_s": 0, "window_s": 10, "hand_on_after_s": 0.5}}
MOVE_DEADLINE_S = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = start_cluster(str(tmp_path_factory.mktemp("controller")), CONFIG)
    yield running
    stop_cluster(running)


def roles(cluster) -> dict[str, str]:
    return {worker_id: w["role"] for worker_id, w in cluster.workers().items()}


def all_workers_up(cluster, timeout_s: float = 180) -> dict[str, dict]:
    """The workers once all three have joined (`up --detach` returns before every worker has, on a loaded
    machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = cluster.workers()
        if sorted(w["role"] for w in workers.values()) == ["decode", "decode", "prefill"]:
            return workers
        if time.monotonic() > deadline:
            raise TimeoutError(f"not all workers joined within {timeout_s} s: {workers}")
        time.sleep(0.5)


def controller_started(registry: Registry, timeout_s: float = 180) -> None:
    """Until the controller has decided once. It starts after profiling an idle worker: under this test's load no
    worker may be idle for a while, and on a slow machine the pin then waited out the whole deadline."""
    deadline = time.monotonic() + timeout_s
    while not registry.read_decisions(1):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the controller made no decision within {timeout_s} s")
        time.sleep(0.5)


def test_pinned_move_under_load_loses_nothing(cluster, engine):
    registry = Registry(cluster.state()["redis_url"])
    before = all_workers_up(cluster)
    controller_started(registry)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    sampling = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)

    async def go():
        async with Client(cluster.address, timeout_s=600) as client:
            first = [asyncio.create_task(client.generate(p, sampling)) for p in prompts[:6]]
            await asyncio.sleep(1.0)  # the first wave is streaming when the pin lands
            await asyncio.to_thread(registry.set_pin, 2, 1)
            second = []
            deadline = time.monotonic() + MOVE_DEADLINE_S
            while sorted((now := await asyncio.to_thread(roles, cluster)).values()) != ["decode", "prefill", "prefill"]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no move within {MOVE_DEADLINE_S} s: {now}")
                if len(second) < 6:  # keep requests arriving while the decode worker drains
                    second.append(asyncio.create_task(client.generate(prompts[6 + len(second)], sampling)))
                await asyncio.sleep(0.5)
            second += [asyncio.create_task(client.generate(p, sampling)) for p in prompts[6 + len(second):]]
            return await asyncio.gather(*first, *second)

    try:
        remote = asyncio.run(go())
    finally:
        registry.clear_pin()
    local = engine.generate(prompts, sampling)
    assert len(remote) == len(prompts)
    assert sorted(r.request_id for r in remote) == sorted({r.request_id for r in remote})  # none duplicated
    assert [r.token_ids for r in remote] == [m.token_ids for m in local]
    workers = cluster.wait_until_idle(timeout_s=30)
    assert all(w["used"] == 0 for w in workers.values())
    decisions = [json.loads(text) for text, _ in registry.read_decisions(100_000)]
    moves = [d for d in decisions if d["action"] == "move"]
    assert moves and "Pinned at (2, 1)" in moves[0]["reason"]
    assert sorted(w["role"] for w in workers.values()) == ["decode", "prefill", "prefill"]
    (left,) = set(before) - set(workers)
    (joined,) = set(workers) - set(before)
    assert before[left]["role"] == "decode" and workers[joined]["role"] == "prefill"
    assert workers[joined]["pid"] == before[left]["pid"]  # switched in place: the same actor process and engine
    assert cluster.router_metric("pdserve_request_hand_ons_total") >= 1  # the drain handed requests on
    assert cluster.router_metric("pdserve_request_migrations_total") == 0  # and nothing failed
