"""The disaggregated cluster end to end on the real parts: `pdserve up` (redis-server, local Ray, a prefill and a
decode worker on SmolLM2, KV over IPC: both are on this machine, and `kv_transfer.backend` is auto), the router over
gRPC on 127.0.0.1, `pdserve status`, `pdserve down`."""

import asyncio
import json
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.client import Client
from pdserve.engine import Prompt, SamplingParams
from pdserve.registry.registry import Registry

from .test_smollm2_oracle import PROMPTS

pytestmark = pytest.mark.model

GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def cluster(basic_cluster):
    return basic_cluster


def generate_all(address: str, prompts, sampling) -> list:
    async def go():
        async with Client(address, timeout_s=300) as client:
            return await asyncio.gather(*(client.generate(p, sampling) for p in prompts))

    return asyncio.run(go())


def test_concurrent_greedy_batch_matches_local_engine_and_transformers(cluster, engine, reference_greedy):
    through_cluster = generate_all(cluster.address, PROMPTS, GREEDY)
    local = engine.generate(PROMPTS, GREEDY)
    for prompt, remote, mine in zip(PROMPTS, through_cluster, local):
        assert remote.token_ids == mine.token_ids, prompt
        assert remote.text == mine.text
        assert remote.finish_reason == mine.finish_reason.value
        assert list(remote.token_ids) == reference_greedy(list(mine.prompt_token_ids), 24)
        assert remote.prompt_tokens == len(mine.prompt_token_ids)


def test_tokens_stream_before_the_last_is_generated(cluster):
    async def go():
        arrivals = []
        async with Client(cluster.address, timeout_s=120) as client:
            sampling = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
            async for response in client.stream(Prompt(text="Once upon a time"), sampling):
                arrivals.append((time.monotonic(), len(response.token_ids), response))
        return arrivals

    arrivals = asyncio.run(go())
    assert sum(n for _, n, _ in arrivals) == 48
    assert len(arrivals) >= 12  # tokens arrive in many messages, not all at the end
    first, last = arrivals[0][0], arrivals[-1][0]
    final = arrivals[-1][2]
    assert last - first > 0.5 * (final.timings.e2e_s - final.timings.ttft_s)
    assert 0 < final.timings.ttft_s < final.timings.e2e_s
    assert final.timings.tpot_s > 0 and final.timings.prefill_s > 0
    assert final.completion_tokens == 48


def test_64_concurrent_streams_complete_and_leave_no_blocks(cluster):
    prompts = [Prompt(text=f"Tell me about the number {i}.") for i in range(64)]
    results = generate_all(cluster.address, prompts, SamplingParams(max_tokens=16, temperature=0))
    assert len(results) == 64
    assert all(r.finish_reason in ("stop", "length") and r.token_ids for r in results)
    assert len({r.request_id for r in results}) == 64
    workers = cluster.wait_until_idle()
    assert {w["role"] for w in workers.values()} == {"prefill", "decode"}
    assert all(w["used"] == 0 and w["running"] == 0 for w in workers.values()), workers


@pytest.mark.parametrize("request_kwargs, field", [
    ({"text": ""}, "prompt"),
    ({"token_ids": {"ids": [1, 99999999]}}, "prompt.token_ids"),
    ({"text": "hi", "sampling": {"top_p": 2.0}}, "top_p"),
    ({"text": "hi", "sampling": {"temperature": -1.0}}, "temperature"),
    ({"text": "hi", "sampling": {"max_tokens": 100000}}, "max_tokens"),
    ({"messages": {"messages": [{"role": "<|im_start|>", "content": "hi"}]}}, "role"),
])
def test_bad_requests_get_invalid_argument_naming_the_field(cluster, request_kwargs, field):
    from pdserve.proto import generation_pb2 as pb
    from pdserve.proto import generation_pb2_grpc as pb_grpc

    async def go():
        async with grpc.aio.insecure_channel(cluster.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _ in stub.Generate(pb.GenerateRequest(**request_kwargs), timeout=30):
                    pass
            return error.value

    error = asyncio.run(go())
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()
    ok = generate_all(cluster.address, [Prompt(text="Hello")], SamplingParams(max_tokens=4, temperature=0))
    assert len(ok[0].token_ids) == 4


def test_finished_requests_append_their_timings_to_redis(cluster):
    result = generate_all(cluster.address, [Prompt(text="Timings, please")],
                          SamplingParams(max_tokens=5, temperature=0))[0]
    entries = Registry(cluster.state()["redis_url"]).read_timings(200)
    mine = [e for e in entries if e["request_id"] == result.request_id]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["completion_tokens"] == "5" and entry["finish_reason"] == "length"
    assert float(entry["ttft_s"]) > 0 and float(entry["e2e_s"]) >= float(entry["ttft_s"])
    assert entry["workers"] == "decode-0,prefill-0"


def test_status_json_lists_every_worker(cluster):
    done = cluster.pdserve("status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["router"]["address"] == cluster.address and status["router"]["healthy"]
    workers = {w["worker_id"]: w for w in status["workers"]}
    assert set(workers) == {"prefill-0", "decode-0"}
    for w in workers.values():
        assert w["state"] == "ready" and w["pid"] > 0 and w["kv_blocks_total"] == 1024


def test_the_pair_on_one_machine_moves_kv_over_ipc(cluster):
    """The workers' own metrics, through the router's /metrics/workers: each counts its pair as ipc, and the decode
    worker has received KV (the tests before this one handed off requests)."""
    url = cluster.http_url.removesuffix("/v1") + "/metrics/workers"
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    pairs = {(s.labels["worker_id"], s.labels["transport"]): s.value for s in samples
             if s.name == "pdserve_worker_kv_pairs"}
    assert pairs == {("prefill-0", "ipc"): 1, ("decode-0", "ipc"): 1}, pairs
    received = sum(s.value for s in samples if s.name == "pdserve_worker_kv_transfer_bytes_total"
                   and s.labels["worker_id"] == "decode-0")
    assert received > 0


def test_generate_cli_through_the_router_matches_local(cluster, tmp_path):
    lines = [{"prompt": "The quick brown fox"}, {"messages": [{"role": "user", "content": "Name a planet."}]},
             {"token_ids": [504, 2365, 6354]}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    common = ["--input", str(path), "--max-tokens", "12", "--temperature", "0", "--json"]
    remote = cluster.pdserve("generate", "--router", cluster.address, "--concurrency", "2", *common)
    local = cluster.pdserve("generate", "--engine", "local", *common)
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    remote_out = [json.loads(line) for line in remote.stdout.splitlines()]
    local_out = [json.loads(line) for line in local.stdout.splitlines()]
    assert [(r["request_id"], r["token_ids"], r["text"]) for r in remote_out] == [
        (r["request_id"], r["token_ids"], r["text"]) for r in local_out]
