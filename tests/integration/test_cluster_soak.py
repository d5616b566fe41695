"""A short soak on a live cluster (real redis-server, Ray, SmolLM2, KV over gloo, gRPC on 127.0.0.1): short
requests with a third cancelled by the client at random points (queued, prefilling, in the handoff, decoding).
None fails, and once idle no KV block is in use on any worker. (`python -m pdserve.bench.soak` is the 2,000-request
run with memory samples, in RELIABILITY.md.)"""

import asyncio

import pytest

from pdserve.bench.soak import CONFIG, soak
from pdserve.cluster.local_cluster import start_cluster, stop_cluster

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = start_cluster(str(tmp_path_factory.mktemp("soak")), CONFIG)
    yield running
    stop_cluster(running)


def test_cancellations_leak_no_blocks(cluster):
    report = asyncio.run(soak(cluster, requests=200, concurrency=16, cancel_share=0.33, sample_every=100, seed=1))
    assert report.failed == 0
    assert report.cancelled >= 30 and report.completed >= 100
    assert report.completed + report.cancelled == 200
    assert set(report.leaked_blocks.values()) == {0}, report.leaked_blocks
