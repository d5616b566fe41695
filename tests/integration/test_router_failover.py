"""Routers that come and go, on a live cluster (`pdserve up`: 1 prefill + 1 decode worker on SmolLM2, a control plane
keeping one router running): every stream survives its router, token for token, no worker restarts, and no KV
block stays held. The faults are `bench.router_failover`'s (which prints their figures for RELIABILITY.md):

- the router is SIGKILLed under 16 streaming clients (12 Python clients and `pdserve generate --router` with 4
  prompts): the control plane starts it again within 10 s, the clients reconnect and their requests are taken
  over from the decode worker; every stream ends token-identical to a fault-free run;
- a second router (`pdserve router`) serves the same workers; clients given both routers lose one of them to
  SIGKILL and go on through the other;
- a router killed for good, whose clients never come back: the decode worker reaps their requests when the lease
  lapses (`router.lease_s`), and every block is free again;
- a router sent SIGTERM (as `pdserve down` and Kubernetes stop one) stops as it should: its running stream ends
  whole within the grace period, a new call is refused, it leaves the registry and exits.
"""

import os
import signal
import time

import grpc
import pytest

from pdserve.bench import router_failover as faults
from pdserve.bench.local_cluster import start_cluster, stop_cluster
from pdserve.control_plane.processes import alive
from pdserve.engine import SamplingParams
from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.model

SAMPLING = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
RESTART_LIMIT_S = 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = start_cluster(str(tmp_path_factory.mktemp("failover")), faults.CONFIG)
    yield running
    stop_cluster(running)


@pytest.fixture(scope="module")
def expected(cluster) -> dict[str, tuple[int, ...]]:
    return faults.reference(cluster, faults.prompts_of(16), SAMPLING)


def test_a_router_killed_mid_stream_restarts_and_every_stream_completes_token_identical(cluster, expected, tmp_path):
    before = cluster.state()["router_pids"]
    report, streams = faults.kill_router(cluster, expected, SAMPLING, cli_share=0.25, workdir=str(tmp_path))
    assert [s.error for s in streams if s.error] == []
    assert (report.requests, report.lost, report.repeated, report.blocks_after) == (16, 0, 0, 0), report
    assert report.router_back_s < RESTART_LIMIT_S, report
    assert report.workers_restarted == 0 and cluster.state()["router_pids"] != before
    assert report.taken_over >= 1, report  # streams went on where they were, not prefilled again


def test_two_routers_share_the_workers_and_one_killed_loses_nothing(cluster, expected):
    report, routers = faults.kill_second_router(cluster, expected, SAMPLING)
    assert len(routers) == 2 and cluster.address in {r["address"] for r in routers}
    assert all(r["pid"] > 0 and r["router_id"].startswith("router-") for r in routers)
    assert (report.requests, report.lost, report.repeated, report.blocks_after) == (16, 0, 0, 0), report
    assert report.workers_restarted == 0


def test_the_requests_of_a_router_gone_for_good_are_reaped_when_its_lease_lapses(cluster):
    report = faults.abandon_router(cluster, requests=4)
    assert report.held > 0 and report.blocks_after == 0, report
    assert report.reaped == 4 and report.freed_s < faults.LEASE_S + 30, report


def test_a_router_sent_sigterm_ends_its_running_stream_whole_then_leaves_the_registry(cluster):
    router = faults.start_router(cluster)
    sampling = pb.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with grpc.insecure_channel(router.address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        call = stub.Generate(pb.GenerateRequest(text="Count to 5:", sampling=sampling), timeout=60)
        messages = [next(call)]  # decoding now
        os.kill(router.pid, signal.SIGTERM)
        messages += list(call)  # the stream goes on to its end within the grace period
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(pb.GenerateRequest(text="Too late", sampling=sampling), timeout=10))
    assert sum(len(m.token_ids) for m in messages) == 12
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    deadline = time.monotonic() + 30
    while alive(router.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(router.pid)
    assert router.address not in {r["address"] for r in faults.status(cluster)["routers"]}
    assert cluster.wait_until_idle()["decode-0"]["used"] == 0
