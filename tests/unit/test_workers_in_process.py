"""The prefill and decode workers' request life without Ray: both in this process, KV over the in-process connector,
random SmolLM2-shaped weights (the same seed on both, so one engine is the oracle)."""

import asyncio
import time

import pytest

from pdserve.cluster.messages import DecodeTask, PrefillTask
from pdserve.cluster.registry import Role
from pdserve.cluster.worker_runtime import WorkerSpec
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine import Engine, EngineConfig, FinishReason, SamplingParams
from pdserve.kv_transfer.in_process import Exchange, InProcessConnector
from pdserve.prefill_worker.worker import PrefillWorker

CONFIG = EngineConfig(model="random:smollm2-135m", num_kv_blocks=64, max_num_batched_tokens=64, num_threads=1)
PROMPT = tuple(range(100, 190))  # 90 tokens: two prefill chunks


@pytest.fixture(scope="module")
def oracle() -> Engine:
    return Engine(CONFIG)


async def started_pair():
    exchange = Exchange()
    prefill = PrefillWorker(WorkerSpec("prefill-0", Role.PREFILL, CONFIG), InProcessConnector("prefill-0", exchange))
    decode = DecodeWorker(WorkerSpec("decode-0", Role.DECODE, CONFIG), InProcessConnector("decode-0", exchange))
    await asyncio.gather(prefill.start(), decode.start())
    return prefill, decode


async def events_until_finished(decode: DecodeWorker, request_id: str):
    events = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        events += [e for e in await decode.events(0.5) if e.request_id == request_id]
        if events and events[-1].finish_reason is not None:
            return events
    raise TimeoutError(request_id)


async def idle(*workers, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(w.runtime.thread.load.kv_blocks_used == 0 for w in workers):
            return True
        await asyncio.sleep(0.02)
    return False


async def stop(*workers):
    for w in workers:
        await w.stop()


def test_handoff_matches_one_engine(oracle):
    sampling = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = oracle.generate([list(PROMPT)], sampling)[0].token_ids

    async def go():
        prefill, decode = await started_pair()
        reservation = await decode.reserve(DecodeTask("r1", PROMPT, sampling, "prefill-0", tag=1))
        assert reservation.num_blocks == 6  # ceil(90 / 16)
        result = await prefill.prefill(PrefillTask("r1", PROMPT, sampling, "decode-0", tag=1))
        assert result.finish_reason is None and result.prefill_s > 0
        await decode.commit("r1", result.first_token_id)
        events = await events_until_finished(decode, "r1")
        tokens = (result.first_token_id,) + tuple(t for e in events for t in e.token_ids)
        assert any(e.kv_transfer_s is not None for e in events)
        assert await idle(prefill, decode)
        await stop(prefill, decode)
        return tokens

    assert asyncio.run(go()) == expected


def test_abort_before_the_prefill_frees_both_sides_and_posts_no_receive():
    sampling = SamplingParams(max_tokens=10, temperature=0)

    async def go():
        prefill, decode = await started_pair()
        await decode.reserve(DecodeTask("r2", PROMPT, sampling, "prefill-0", tag=2))
        assert decode.runtime.thread.call(lambda e: e.blocks.num_used).result() == 6
        assert decode.runtime.connector.pending == {}  # nothing is coming yet: no receive waits for it
        assert await prefill.abort("r2", 2) is False  # never saw it: nothing was sent
        await decode.abort("r2", kv_sent=False)
        assert await idle(prefill, decode)
        events = await decode.events(0.1)
        await stop(prefill, decode)
        return events

    events = asyncio.run(go())
    assert [e.finish_reason for e in events] == [FinishReason.ABORT]


def test_abort_after_the_kv_left_drains_it_on_the_decode_side():
    sampling = SamplingParams(max_tokens=10, temperature=0)

    async def go():
        prefill, decode = await started_pair()
        await decode.reserve(DecodeTask("r4", PROMPT, sampling, "prefill-0", tag=4))
        result = await prefill.prefill(PrefillTask("r4", PROMPT, sampling, "decode-0", tag=4))
        assert result.finish_reason is None  # the KV is on its way
        sent = await prefill.abort("r4", 4)
        assert await prefill.abort("r4", 5) is False  # another life of the same id (another tag) sent nothing
        await decode.abort("r4", kv_sent=sent)
        assert await idle(prefill, decode)
        await stop(prefill, decode)
        return sent, decode.runtime.connector.exchange.in_flight

    sent, in_flight = asyncio.run(go())
    assert sent is True
    assert in_flight == {}  # the sent KV was taken off the wire, not left for a receive that never comes


def test_a_first_token_that_ends_the_request_sends_no_kv():
    sampling = SamplingParams(max_tokens=1, temperature=0)

    async def go():
        prefill, decode = await started_pair()
        await decode.reserve(DecodeTask("r3", PROMPT, sampling, "prefill-0", tag=3))
        result = await prefill.prefill(PrefillTask("r3", PROMPT, sampling, "decode-0", tag=3))
        sent = await prefill.abort("r3", 3)
        await decode.abort("r3")  # what the router does when the first token ended the request
        assert await idle(prefill, decode)
        await stop(prefill, decode)
        return result, sent, prefill.runtime.connector.exchange.in_flight

    result, sent, in_flight = asyncio.run(go())
    assert result.finish_reason is FinishReason.LENGTH
    assert sent is False and in_flight == {}


def test_hand_on_gives_back_decoding_requests_and_frees_their_blocks(oracle):
    """A decode worker leaving its pool: each decoding request ends with a handed-on event (the router resumes it
    elsewhere), its blocks are freed, and nothing more comes for it."""
    sampling = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def go():
        prefill, decode = await started_pair()
        await decode.reserve(DecodeTask("r5", PROMPT, sampling, "prefill-0", tag=5))
        result = await prefill.prefill(PrefillTask("r5", PROMPT, sampling, "decode-0", tag=5))
        await decode.commit("r5", result.first_token_id)
        events = []
        while not any(e.token_ids for e in events):  # decoding here
            events += await decode.events(0.5)
        handed = await decode.hand_on()
        events += await decode.events(0.5)
        assert await idle(prefill, decode)
        events += await decode.events(0.2)
        await stop(prefill, decode)
        return handed, events

    handed, events = asyncio.run(go())
    assert handed == 1
    last = events[-1]
    assert last.handed_on and last.finish_reason is FinishReason.ABORT
    assert sum(1 for e in events if e.handed_on) == 1
    assert sum(len(e.token_ids) for e in events) < 39  # it stopped before the end
