"""A short soak on a live cluster (real redis-server, Ray, SmolLM2, KV over IPC between this machine's two workers,
gRPC on 127.0.0.1): short requests (120) with a third cancelled by the client at random points (queued, prefilling,
in the handoff, decoding). None fails, and once idle no KV block is in use on any worker. Prefix caching is on (the
default) and the prompts share their chat template's leading blocks (eight topics), so cached blocks are shared by
requests cancelled at every stage, and still none leaks. (`python -m pdserve.bench.soak` is the 2,000-request run
with memory samples, in RELIABILITY.md.)"""

import asyncio

import pytest

from pdserve.bench.soak import soak

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def cluster(basic_cluster):
    return basic_cluster


def test_cancellations_leak_no_blocks(cluster):
    report = asyncio.run(soak(cluster, requests=120, concurrency=16, cancel_share=0.33, sample_every=60, seed=1))
    assert report.failed == 0 and report.wrong == 0
    assert report.cancelled >= 20 and report.completed >= 60
    assert report.completed + report.cancelled == 120
    assert set(report.leaked_blocks.values()) == {0}, report.leaked_blocks
