"""Cancelling a request frees its KV blocks on both workers, whether it is in its prefill, in its KV transfer or in
its decode. The cluster pauses every KV send mid-transfer (faults.kv_send_pause_s) so a cancel can land
there; everything else is the real cluster. Its decode worker speculates by lookahead decoding: after the cancels,
four greedy requests decoded together are the local engine's, token for token."""

import asyncio
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.bench.local_cluster import start_cluster, stop_cluster
from pdserve.client import Client
from pdserve.engine import Prompt, SamplingParams

pytestmark = pytest.mark.model

PAUSE_S = 4.0
CONFIG = {"engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 256,
                     "speculative": {"method": "lookahead", "max_batch": 4, "adaptive": False}},
          "kv_transfer": {"timeout_s": 30}, "faults": {"kv_send_pause_s": PAUSE_S}}
LONG_PROMPT = Prompt(token_ids=tuple(range(1000, 4000)))  # 3000 tokens: seconds of prefill on one core


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = start_cluster(str(tmp_path_factory.mktemp("cancel")), CONFIG)
    yield running
    stop_cluster(running)


def load_where(cluster, holds, timeout_s: float = 1.0) -> dict:
    """The workers' load once `holds(load)` (heartbeats carry it, a second apart or later on a busy machine), or as it
    is after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not holds(load := cluster.workers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return load


def both_hold_blocks(load: dict) -> bool:
    return load["prefill-0"]["used"] > 0 and load["decode-0"]["used"] > 0


def cancel_when(cluster, prompt: Prompt, sampling: SamplingParams, tokens_before_cancel: int, wait_s: float,
                expect=lambda load: True):
    """Stream a request; after `tokens_before_cancel` tokens and then `wait_s` seconds, read the workers' load (until
    `expect(load)` holds, 1 s at most) and cancel. Returns (load at the cancel, tokens received by then; with
    `tokens_before_cancel` 0, whether any answer had come at all, as -1 when none had)."""
    async def go():
        async with Client(cluster.address, timeout_s=120) as client:
            stream = client.stream(prompt, sampling)
            received = 0
            if tokens_before_cancel:
                async for response in stream:
                    received += len(response.token_ids)
                    if received >= tokens_before_cancel:
                        break
            else:
                reader = asyncio.ensure_future(stream.read())
                await asyncio.sleep(0.2)
                assert not reader.done(), "the request answered before it could be cancelled"
            await asyncio.sleep(wait_s)
            load = await asyncio.to_thread(load_where, cluster, expect)
            if not tokens_before_cancel and not reader.done():
                received = -1  # no first token yet: the request is still in its prefill
            stream.cancel()
            return load, received

    return asyncio.run(go())


def test_cancel_mid_prefill_frees_blocks_on_both_sides(cluster):
    load, received = cancel_when(cluster, LONG_PROMPT, SamplingParams(max_tokens=8, temperature=0), 0, 2.5,
                                 both_hold_blocks)
    assert received == -1  # cancelled before its first token: mid-prefill
    assert load["prefill-0"]["used"] > 0  # the prompt was being prefilled
    assert load["decode-0"]["used"] > 0  # and the decode worker had reserved its blocks
    idle = cluster.wait_until_idle(timeout_s=PAUSE_S + 10)
    assert all(w["used"] == 0 and w["running"] == 0 for w in idle.values()), idle


def test_cancel_mid_transfer_frees_blocks_on_both_sides(cluster):
    sampling = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    started = time.monotonic()
    load, received = cancel_when(cluster, Prompt(text="Once upon a time"), sampling, 1, 1.3, both_hold_blocks)
    assert received == 1 and time.monotonic() - started < PAUSE_S  # first token in, KV still paused on the wire
    assert load["prefill-0"]["used"] > 0 and load["decode-0"]["used"] > 0
    idle = cluster.wait_until_idle(timeout_s=PAUSE_S + 10)
    assert all(w["used"] == 0 and w["running"] == 0 for w in idle.values()), idle


def test_cancel_mid_decode_frees_blocks_on_both_sides(cluster):
    sampling = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    load, received = cancel_when(cluster, Prompt(text="Once upon a time"), sampling, 5, 1.2)
    assert received >= 5
    assert load["decode-0"]["used"] > 0 and load["prefill-0"]["used"] == 0
    idle = cluster.wait_until_idle()
    assert all(w["used"] == 0 and w["running"] == 0 for w in idle.values()), idle


def lookahead_steps(cluster) -> float:
    """The decode worker's speculative steps by lookahead (its metrics, through the router)."""
    url = cluster.http_url.removesuffix("/v1") + "/metrics/workers"
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "pdserve_worker_speculative_steps_total" and s.labels.get("method") == "lookahead")


def test_the_pair_still_works_after_the_cancels(cluster, engine):
    prompts = [Prompt(text=f"Item {i}: a list of the planets, in order:") for i in range(4)]
    sampling = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    async def go():
        async with Client(cluster.address, timeout_s=120) as client:
            return await asyncio.gather(*(client.generate(p, sampling) for p in prompts))

    results = asyncio.run(go())
    assert [r.token_ids for r in results] == [o.token_ids for o in engine.generate(prompts, sampling)]
    assert lookahead_steps(cluster) > 0
    assert cluster.wait_until_idle()["decode-0"]["used"] == 0
