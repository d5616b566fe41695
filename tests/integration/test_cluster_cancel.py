"""Cancelling a request frees its KV blocks on both workers, whether it is in its prefill, in its KV transfer or in
its decode. The cluster pauses every KV send mid-transfer (faults.kv_send_pause_s) so a cancel can land
there; everything else is the real cluster."""

import asyncio
import time

import pytest

from pdserve.bench.local_cluster import start_cluster, stop_cluster
from pdserve.client import Client
from pdserve.engine import Prompt, SamplingParams

pytestmark = pytest.mark.model

PAUSE_S = 4.0
CONFIG = {"engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 256},
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


def test_the_pair_still_works_after_the_cancels(cluster):
    async def go():
        async with Client(cluster.address, timeout_s=120) as client:
            sampling = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
            return await asyncio.gather(*(client.generate(Prompt(text=f"Item {i}:"), sampling) for i in range(4)))

    results = asyncio.run(go())
    assert [len(r.token_ids) for r in results] == [6] * 4
    assert cluster.wait_until_idle()["decode-0"]["used"] == 0
