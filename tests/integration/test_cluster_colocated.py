"""Colocated mode (the baseline): the same router and `pdserve up`, with one worker doing both phases."""

import asyncio
import time

import pytest

from pdserve.bench.local_cluster import start_cluster, stop_cluster
from pdserve.client import Client
from pdserve.engine import Prompt, SamplingParams

from .test_smollm2_oracle import PROMPTS

pytestmark = pytest.mark.model

CONFIG = {"mode": "colocated", "engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 256},
          "workers": {"colocated": {"count": 1, "resources": {"cpus": 2}}}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = start_cluster(str(tmp_path_factory.mktemp("colocated")), CONFIG)
    yield running
    stop_cluster(running)


def test_colocated_greedy_batch_matches_local_engine(cluster, engine):
    sampling = SamplingParams(max_tokens=24, temperature=0)

    async def go():
        async with Client(cluster.address, timeout_s=300) as client:
            return await asyncio.gather(*(client.generate(p, sampling) for p in PROMPTS))

    remote = asyncio.run(go())
    local = engine.generate(PROMPTS, sampling)
    assert [r.token_ids for r in remote] == [m.token_ids for m in local]
    assert all(r.timings.prefill_s > 0 and r.timings.kv_transfer_s == 0 for r in remote)
    workers = cluster.wait_until_idle()
    assert list(workers) == ["colocated-0"] and workers["colocated-0"]["role"] == "both"
    assert workers["colocated-0"]["used"] == 0


def test_colocated_cancel_mid_decode_frees_blocks(cluster):
    async def go():
        async with Client(cluster.address, timeout_s=120) as client:
            stream = client.stream(Prompt(text="Once upon a time"),
                                   SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
            received, load = 0, {}
            deadline = time.monotonic() + 60
            async for response in stream:  # still reading: the request stays live while its load is looked at
                received += len(response.token_ids)
                if received >= 5:
                    load = await asyncio.to_thread(cluster.workers)  # heartbeats come each second
                    if load["colocated-0"]["used"] > 0 or time.monotonic() > deadline:
                        break
            stream.cancel()
            return load

    load = asyncio.run(go())
    assert load["colocated-0"]["used"] > 0
    assert cluster.wait_until_idle()["colocated-0"]["used"] == 0
