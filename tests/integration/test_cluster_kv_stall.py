"""A KV transfer that stalls, on a live cluster (real redis-server, Ray, SmolLM2, gRPC on 127.0.0.1), with KV over
gloo, over NIXL and over IPC.

The prefill worker's first send pauses past the transfer timeout (fault injection). The decode worker's receive
times out (nothing hangs); over gloo the pair closes, both sides drop it and it is formed again; over NIXL and IPC
the receiver tells the sender it dropped the transfer; the request resumes
(its prompt prefilled again) and finishes token-identical to the local engine; later requests are unaffected, and
no KV block stays in use.
"""

import asyncio

import pytest

from pdserve.bench.local_cluster import start_cluster, stop_cluster
from pdserve.client import Client
from pdserve.engine import SamplingParams

from .test_smollm2_oracle import PROMPTS

pytestmark = pytest.mark.model

CONFIG = {"engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 256},
          "kv_transfer": {"timeout_s": 2.0, "checksums": True},
          "faults": {"kv_send_pause_s": 4.0, "kv_send_pause_count": 1},
          "workers": {"prefill": {"count": 1, "resources": {"cpus": 1}},
                      "decode": {"count": 1, "resources": {"cpus": 1}}}}
SAMPLING = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["gloo", "nixl", "ipc"])
def cluster(request, tmp_path_factory):
    config = CONFIG
    if request.param == "nixl":
        pytest.importorskip("nixl._api")
    if request.param != "gloo":
        config = {**CONFIG, "kv_transfer": {"timeout_s": 2.0, "backend": request.param}}  # reads land unchecked
    running = start_cluster(str(tmp_path_factory.mktemp("stall")), config)
    yield running
    stop_cluster(running)


def test_a_stalled_transfer_times_out_and_the_request_resumes(cluster, engine):
    expected = [r.token_ids for r in engine.generate(PROMPTS, SAMPLING)]

    async def go():
        async with Client(cluster.address, timeout_s=300) as client:
            stalled = await client.generate(PROMPTS[0], SAMPLING)
            after = await asyncio.gather(*(client.generate(p, SAMPLING) for p in PROMPTS))
            return stalled, after

    stalled, after = asyncio.run(go())
    assert stalled.token_ids == expected[0]
    assert cluster.router_metric("pdserve_request_migrations_total") >= 1
    assert [r.token_ids for r in after] == expected
    workers = cluster.wait_until_idle(timeout_s=30)
    assert len(workers) == 2 and all(w["used"] == 0 for w in workers.values()), workers
