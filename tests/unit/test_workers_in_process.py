"""The prefill and decode workers' request life without Ray: both in this process, KV over the in-process connector,
random SmolLM2-shaped weights (the same seed on both, so one engine is the oracle). The prefill worker announces
its sends to the decode worker directly, as over Ray."""

import asyncio
import time

import pytest

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine import Engine, EngineConfig, FinishReason, SamplingParams
from pdserve.kv_transfer.in_process import Exchange, InProcessConnector
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve.registry.entries import Role
from pdserve.worker.messages import DecodeTask, Owner, PrefillTask
from pdserve.worker.runtime import WorkerSpec

CONFIG = EngineConfig(model="random:smollm2-135m", num_kv_blocks=64, max_num_batched_tokens=64, num_threads=1)
PROMPT = tuple(range(100, 190))  # 90 tokens: two prefill chunks
ROUTER = "router-a"


@pytest.fixture(scope="module")
def oracle() -> Engine:
    return Engine(CONFIG)


class LocalPeers:
    """The decode workers of a test, reached in this process (what the KV pair keeper does over Ray)."""

    def __init__(self) -> None:
        self.workers: dict[str, DecodeWorker] = {}
        self.calls: list[asyncio.Task] = []

    def announce(self, decode_worker: str, announcement) -> None:
        self.calls.append(asyncio.ensure_future(self.workers[decode_worker].announce(announcement)))


async def started_pair(lease_s: float = 30.0, exchange: Exchange | None = None):
    exchange = exchange or Exchange()
    peers = LocalPeers()
    prefill = PrefillWorker(WorkerSpec("prefill-0", Role.PREFILL, CONFIG), InProcessConnector("prefill-0", exchange),
                            peers=peers)
    decode = DecodeWorker(WorkerSpec("decode-0", Role.DECODE, CONFIG, lease_s=lease_s),
                          InProcessConnector("decode-0", exchange))
    peers.workers["decode-0"] = decode
    await asyncio.gather(prefill.start(), decode.start())
    return prefill, decode


async def handed_off(prefill: PrefillWorker, decode: DecodeWorker, key: str, sampling: SamplingParams,
                     owner: Owner | None = None):
    """Reserve on the decode worker, prefill (the KV goes over and is announced); the prefill's answer."""
    owner = owner or Owner(ROUTER, key)
    decode_id, prefill_id = decode.runtime.spec.worker_id, prefill.runtime.spec.worker_id
    reservation = await decode.reserve(DecodeTask(key, PROMPT, sampling, owner, prefill_id))
    assert reservation is not None
    return await prefill.prefill(PrefillTask(key, PROMPT, sampling, decode_id, reservation.tag,
                                             reservation.cached_blocks))


async def events_until_finished(decode: DecodeWorker, request_id: str, router_id: str = ROUTER):
    events = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        events += [e for e in await decode.events(router_id, 0.5) if e.request_id == request_id]
        if events and events[-1].finish_reason is not None:
            return events
    raise TimeoutError(request_id)


async def events_with_tokens(decode: DecodeWorker, router_id: str, count: int, timeout_s: float = 60.0):
    """The router's events until they carry `count` tokens (TimeoutError past `timeout_s`)."""
    events = []
    deadline = time.monotonic() + timeout_s
    while sum(len(e.token_ids) for e in events) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} tokens for {router_id}")
        events += await decode.events(router_id, 0.5)
    return events


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


def test_handoff_matches_one_engine_and_events_carry_their_positions(oracle):
    sampling = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = oracle.generate([list(PROMPT)], sampling)[0].token_ids

    async def go():
        prefill, decode = await started_pair()
        reservation = await decode.reserve(DecodeTask("r1", PROMPT, sampling, Owner(ROUTER, "client-1"), "prefill-0"))
        assert reservation.num_blocks == 6  # ceil(90 / 16)
        result = await prefill.prefill(PrefillTask("r1", PROMPT, sampling, "decode-0", reservation.tag))
        assert result.finish_reason is None and result.prefill_s > 0
        events = await events_until_finished(decode, "r1")
        assert any(e.kv_transfer_s is not None for e in events)
        assert await idle(prefill, decode)
        await stop(prefill, decode)
        return result.first_token_id, events

    first, events = asyncio.run(go())
    tokens = tuple(t for e in events for t in e.token_ids)
    assert tokens == expected and tokens[0] == first  # the decode worker's journal starts with the first token
    assert [e.position for e in events if e.token_ids] == list(range(len(expected)))


def test_abort_before_the_prefill_frees_both_sides_and_posts_no_receive():
    sampling = SamplingParams(max_tokens=10, temperature=0)

    async def go():
        prefill, decode = await started_pair()
        await decode.reserve(DecodeTask("r2", PROMPT, sampling, Owner(ROUTER, "r2"), "prefill-0"))
        assert decode.runtime.thread.call(lambda e: e.blocks.num_used).result() == 6
        assert decode.runtime.connector.pending == {}  # nothing is coming yet: no receive waits for it
        await prefill.abort("r2")
        await decode.abort("r2", ROUTER)
        assert await idle(prefill, decode)
        events = await decode.events(ROUTER, 0.1)
        await stop(prefill, decode)
        return events

    assert asyncio.run(go()) == []  # its router aborted it: nothing more to collect


def test_an_abort_run_before_its_reserve_and_prefill_leaves_nothing_held():
    """Ray may run a router's abort before the calls it sent earlier: those calls, run late, take nothing."""
    sampling = SamplingParams(max_tokens=10, temperature=0)

    async def go():
        prefill, decode = await started_pair()
        await decode.abort("r7", ROUTER)
        await prefill.abort("r7")
        reservation = await decode.reserve(DecodeTask("r7", PROMPT, sampling, Owner(ROUTER, "r7"), "prefill-0"))
        result = await prefill.prefill(PrefillTask("r7", PROMPT, sampling, "decode-0", 1))
        used = [w.runtime.thread.call(lambda e: (e.blocks.num_used, e.num_requests)).result()
                for w in (prefill, decode)]
        await handed_off(prefill, decode, "r8", sampling)  # another request is served as before
        events = await events_until_finished(decode, "r8")
        await stop(prefill, decode)
        return reservation, result, used, events

    reservation, result, used, events = asyncio.run(go())
    assert reservation is None
    assert result.first_token_id is None and result.finish_reason is FinishReason.ABORT
    assert used == [(0, 0), (0, 0)]
    assert sum(len(e.token_ids) for e in events) == 10


def test_kv_announced_for_an_aborted_request_is_discarded_not_left_on_the_wire():
    """The decode side let the request go first (aborted, or reaped after its router died) and the prefill worker
    sends its KV after: the announcement finds no reservation, and the KV is received and dropped."""
    sampling = SamplingParams(max_tokens=10, temperature=0)

    async def go():
        prefill, decode = await started_pair()
        reservation = await decode.reserve(DecodeTask("r4", PROMPT, sampling, Owner(ROUTER, "r4"), "prefill-0"))
        await decode.abort("r4", ROUTER)
        result = await prefill.prefill(PrefillTask("r4", PROMPT, sampling, "decode-0", reservation.tag))
        await asyncio.gather(*prefill.peers.calls)
        assert result.finish_reason is None  # the KV went
        assert await idle(prefill, decode)
        await stop(prefill, decode)
        return decode.runtime.connector.exchange

    exchange = asyncio.run(go())
    assert exchange.in_flight == {} and exchange.discarding == set()


def test_abort_while_the_kv_is_on_the_wire_frees_both_sides():
    sampling = SamplingParams(max_tokens=10, temperature=0)

    async def go():
        prefill, decode = await started_pair()
        await handed_off(prefill, decode, "r5", sampling)
        await prefill.abort("r5")  # too late: its send finishes
        await decode.abort("r5", ROUTER)
        assert await idle(prefill, decode)
        await stop(prefill, decode)
        return decode.runtime.connector.exchange

    exchange = asyncio.run(go())
    assert exchange.in_flight == {}


def test_a_first_token_that_ends_the_request_sends_no_kv():
    sampling = SamplingParams(max_tokens=1, temperature=0)

    async def go():
        prefill, decode = await started_pair()
        result = await handed_off(prefill, decode, "r3", sampling)
        await decode.abort("r3", ROUTER)  # what the router does when the first token ended the request
        assert await idle(prefill, decode)
        await stop(prefill, decode)
        return result, prefill.runtime.connector.exchange.in_flight, prefill.peers.calls

    result, in_flight, announcements = asyncio.run(go())
    assert result.finish_reason is FinishReason.LENGTH
    assert in_flight == {} and announcements == []


def test_an_abort_from_a_router_that_no_longer_owns_the_request_is_ignored():
    sampling = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)

    async def go():
        prefill, decode = await started_pair()
        await handed_off(prefill, decode, "r6", sampling, Owner(ROUTER, "client-6"))
        await decode.abort("r6", "router-other")  # not its owner
        events = await events_until_finished(decode, "r6")
        assert await idle(prefill, decode)
        await stop(prefill, decode)
        return events

    events = asyncio.run(go())
    assert events[-1].finish_reason is FinishReason.LENGTH and sum(len(e.token_ids) for e in events) == 30


def test_the_requests_of_a_router_that_stops_collecting_are_reaped_after_its_lease():
    sampling = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def go():
        prefill, decode = await started_pair(lease_s=1.5)
        await handed_off(prefill, decode, "r7", sampling, Owner("router-dead", "client-7"))
        started = time.monotonic()
        assert await idle(prefill, decode, timeout_s=30)  # nobody collects: reaped, blocks freed
        reaped_after = time.monotonic() - started
        late = await decode.events("router-dead", 0.1)
        reaped = decode.runtime.metrics.reaped
        await stop(prefill, decode)
        return reaped_after, late, reaped

    reaped_after, late, reaped = asyncio.run(go())
    assert 1.0 < reaped_after < 10 and reaped == 1
    assert late == []  # its outbox went with it


def test_adoption_moves_a_running_request_to_another_router_with_what_its_client_lacks(oracle):
    """Router A streams a few tokens, then its client reconnects to router B holding them: B gets the journal past
    them and every later event; A's stream of it ends. Together: the oracle's tokens, each once."""
    sampling = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = oracle.generate([list(PROMPT)], sampling)[0].token_ids

    async def go():
        prefill, decode = await started_pair()
        await handed_off(prefill, decode, "c8@router-a#0", sampling, Owner("router-a", "c8"))
        seen_by_a = await events_with_tokens(decode, "router-a", 4)
        client_has = [t for e in seen_by_a for t in e.token_ids]
        assert await decode.adopt("c8", "router-b", len(client_has) + 50, "") is None  # ahead of the worker: refused
        assert await decode.adopt("someone-else", "router-b", 0, "") is None
        adoption = await decode.adopt("c8", "router-b", len(client_has), "")
        later_a = await decode.events("router-a", 0.5)
        rest = list(adoption.events) + await events_until_finished(decode, "c8@router-a#0", "router-b")
        assert await idle(prefill, decode)
        await stop(prefill, decode)
        return client_has, adoption, later_a, rest

    client_has, adoption, later_a, rest = asyncio.run(go())
    assert adoption.request_id == "c8@router-a#0" and adoption.prefill_worker == "prefill-0"
    assert [e.adopted_by for e in later_a if e.finish_reason] == ["router-b"]
    resumed = [t for e in rest for t in e.token_ids[max(0, len(client_has) - e.position):]]
    assert tuple(client_has + resumed) == expected


def test_hand_on_gives_back_decoding_requests_and_frees_their_blocks():
    """A decode worker leaving its pool: each decoding request ends with a handed-on event (the router resumes it
    elsewhere), its blocks are freed, and nothing more comes for it."""
    sampling = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def go():
        prefill, decode = await started_pair()
        await handed_off(prefill, decode, "r5", sampling)
        events = await events_with_tokens(decode, ROUTER, 2)  # decoding here
        handed = await decode.hand_on()
        events += await decode.events(ROUTER, 0.5)
        assert await idle(prefill, decode)
        events += await decode.events(ROUTER, 0.2)
        await stop(prefill, decode)
        return handed, events

    handed, events = asyncio.run(go())
    assert handed == 1
    last = events[-1]
    assert last.handed_on and last.finish_reason is FinishReason.ABORT
    assert sum(1 for e in events if e.handed_on) == 1
    assert sum(len(e.token_ids) for e in events) < 40  # it stopped before the end
