"""The fleet grows and shrinks live (real redis-server, Ray, SmolLM2, gRPC on 127.0.0.1), driven by a plug-in policy:
the example queue-threshold scaler (`pdserve.examples.queue_scaler`), loaded by name from the config.

The decode workers run two requests at a time, so a wave of requests queues on the one prefill worker or the one
decode worker; the policy adds a worker to that pool through Ray while requests stream, and once the queues have
been empty a few ticks it drains one and stops it. Every request completes, token-identical to the local engine;
each add and remove is a decision with its reason on the Redis stream, and the routers' metrics count the workers
and the worker time they held.
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
                      "decode": {"count": 1, "resources": {"cpus": 0.5}, "engine": {"max_num_seqs": 2}}},
          "controller": {"enabled": True, "interval_s": 1.0, "window_s": 10, "min_workers": 2, "max_workers": 3,
                         "policy": "pdserve.examples.queue_scaler:QueueScaler",
                         "policy_config": {"add_above": 2, "quiet_ticks": 3}}}
REQUESTS = 12
CHANGE_DEADLINE_S = 180


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = start_cluster(str(tmp_path_factory.mktemp("autoscale")), CONFIG)
    yield running
    stop_cluster(running)


def decisions(registry: Registry, action: str) -> list[dict]:
    entries = [json.loads(text) for text, _ in registry.read_decisions(100_000)]
    return [d for d in entries if d["action"] == action]


def wait_for(what: str, check, timeout_s: float = CHANGE_DEADLINE_S):
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.5)
    return found


def test_a_queue_adds_a_worker_and_quiet_removes_one_losing_nothing(cluster, engine):
    registry = Registry(cluster.state()["redis_url"])
    wait_for("both workers up", lambda: len(cluster.workers()) == 2)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(REQUESTS)]
    sampling = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)

    async def go():
        async with Client(cluster.address, timeout_s=600) as client:
            tasks = [asyncio.create_task(client.generate(p, sampling)) for p in prompts[:6]]
            deadline = time.monotonic() + CHANGE_DEADLINE_S
            while not await asyncio.to_thread(decisions, registry, "add"):  # the wave queues on decode
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no add within {CHANGE_DEADLINE_S} s")
                await asyncio.sleep(0.5)
            for prompt in prompts[6:]:  # requests keep coming while the new worker starts and joins
                tasks.append(asyncio.create_task(client.generate(prompt, sampling)))
                await asyncio.sleep(1.0)
            return await asyncio.gather(*tasks)

    remote = asyncio.run(go())
    local = engine.generate(prompts, sampling)
    assert sorted(r.request_id for r in remote) == sorted({r.request_id for r in remote})  # none duplicated
    assert [r.token_ids for r in remote] == [m.token_ids for m in local]  # none lost, none changed

    (add,) = decisions(registry, "add")
    (grown,) = add["add"]  # the pool the wave queued on first (prefill, or decode running two at a time)
    assert f"requests wait per {grown} worker" in add["reason"]
    removed = wait_for("a remove once quiet", lambda: decisions(registry, "remove"))
    assert "No queue for 3 ticks" in removed[0]["reason"]
    workers = wait_for("back to two workers", lambda: (w := cluster.workers()) and len(w) == 2 and w)
    assert sorted(w["role"] for w in workers.values()) == ["decode", "prefill"]
    assert not [d for d in decisions(registry, "hold") if d["reason"].startswith(("Refused", "Adding", "Removing"))]
    assert len(decisions(registry, "add")) == 1  # max_workers 3: one add at most while there are three
    assert cluster.router_metric("pdserve_request_migrations_total") == 0
    wait_for("the router sees two workers", lambda: cluster.router_metric('pdserve_workers{role="decode"') == 1, 10)
    assert cluster.router_metric("pdserve_worker_seconds_total") > 0
