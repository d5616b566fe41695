"""A request's life at the router (`router.orchestrator`) over real prefill and decode workers in this process (KV
over the in-process connector, random SmolLM2-shaped weights; one engine is the oracle) reached through handles
that stand in for Ray's: two routers share the workers, and a client that reconnects from one to the other gets
every token once, whether the request is still running (taken over) or not (resumed from the tokens it has)."""

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine import FinishReason, SamplingParams
from pdserve.kv_transfer.in_process import Exchange, InProcessConnector
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve.registry.entries import Role, WorkerState
from pdserve.router.errors import TakenOver
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.request_builder import Resume, ValidRequest
from pdserve.worker.runtime import WorkerSpec
from pdserve.worker_actor import Worker

from .test_workers_in_process import CONFIG, PROMPT, LocalPeers, idle, oracle  # noqa: F401

SAMPLING = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


class LocalHandle:
    """A stand-in for a Ray actor handle to a worker in this process: `handle.method.remote(*args)` is a coroutine
    of the actor class's `method(*args)`, on the role object given."""

    def __init__(self, front: PrefillWorker | DecodeWorker) -> None:
        self._obj = Worker.__new__(Worker)  # the actor's own dispatch, around a worker with in-process KV
        self._obj.front = front

    def __getattr__(self, name: str):
        method = getattr(self._obj, name)
        return SimpleNamespace(remote=lambda *args, **kwargs: method(*args, **kwargs))


async def cluster():
    """A prefill and a decode worker, paired, and two routers that both know them."""
    exchange, peers = Exchange(), LocalPeers()
    prefill = PrefillWorker(WorkerSpec("prefill-0", Role.PREFILL, CONFIG), InProcessConnector("prefill-0", exchange),
                            peers=peers)
    decode = peers.workers["decode-0"] = DecodeWorker(WorkerSpec("decode-0", Role.DECODE, CONFIG),
                                                      InProcessConnector("decode-0", exchange))
    await asyncio.gather(prefill.start(), decode.start())
    routers = [Orchestrator(None, "test", False, CONFIG.block_size, router_id=f"router-{n}") for n in "ab"]
    for router in routers:
        for worker, role, peer in ((prefill, Role.PREFILL, "decode-0"), (decode, Role.DECODE, "prefill-0")):
            info = dataclasses.replace(worker.runtime.info(), role=role, state=WorkerState.READY, paired=(peer,))
            router.membership.join(info, LocalHandle(worker))
    return prefill, decode, routers


async def collect(pieces) -> list:
    return [p async for p in pieces]


async def shut(prefill, decode, routers) -> None:
    for router in routers:
        await router.membership.close()
    await prefill.stop()
    await decode.stop()


def test_a_request_through_the_router_matches_one_engine(oracle):  # noqa: F811
    expected = oracle.generate([list(PROMPT)], SAMPLING)[0].token_ids

    async def go():
        prefill, decode, routers = await cluster()
        pieces = [p async for p in routers[0].generate(ValidRequest("r1", PROMPT, SAMPLING))]
        assert await idle(prefill, decode)
        await shut(prefill, decode, routers)
        return pieces

    pieces = asyncio.run(go())
    assert tuple(t for p in pieces for t in p.token_ids) == expected
    assert pieces[-1].finish_reason is FinishReason.LENGTH and pieces[-1].completion_tokens == 24
    assert all(p.token_ids for p in pieces)  # the decode worker's copy of the first token was not sent again


def test_a_request_id_sent_again_right_after_it_ended_is_a_new_request(oracle):  # noqa: F811
    """The workers know each attempt under a key of its own: the first request's end (acknowledged with a later
    poll) never touches the second one's."""
    expected = oracle.generate([list(PROMPT)], SAMPLING)[0].token_ids

    async def go():
        prefill, decode, routers = await cluster()
        outputs = []
        for _ in range(3):
            pieces = await asyncio.wait_for(collect(routers[0].generate(ValidRequest("same-id", PROMPT, SAMPLING))), 60)
            outputs.append(tuple(t for p in pieces for t in p.token_ids))
        await shut(prefill, decode, routers)
        return outputs

    assert asyncio.run(go()) == [expected] * 3


@pytest.mark.parametrize("still_running", [True, False])
def test_a_client_that_reconnects_to_another_router_gets_every_token_once(oracle, still_running):  # noqa: F811
    """Router a streams 5 tokens; the client reconnects to router b with them. Still running: b takes it over from
    the decode worker and a's stream of it ends (TakenOver). Aborted meanwhile (its router was gone and its lease
    lapsed): b runs it again from the prompt and those 5 tokens."""
    expected = oracle.generate([list(PROMPT)], SAMPLING)[0].token_ids

    async def go():
        prefill, decode, (a, b) = await cluster()
        first = a.generate(ValidRequest("c1", PROMPT, SAMPLING))
        has: list[int] = []
        while len(has) < 5:
            has += (await anext(first)).token_ids
        if not still_running:
            await first.aclose()  # its router lets it go: aborted on both workers
        resumed = ValidRequest("c1", PROMPT, SAMPLING, Resume(tuple(has)))
        rest = [p async for p in b.generate(resumed)]
        ended = None
        if still_running:
            try:
                async for _ in first:
                    pass
            except TakenOver as e:
                ended = e
        assert await idle(prefill, decode)
        outcomes = {o: b.metrics.requests.labels(outcome=o)._value.get() for o in ("length", "taken_over")}
        outcomes["a_taken_over"] = a.metrics.requests.labels(outcome="taken_over")._value.get()
        outcomes |= {how: b.metrics.resumes.labels(how=how)._value.get() for how in ("taken_over", "rerun")}
        await shut(prefill, decode, [a, b])
        return has, rest, ended, outcomes

    has, rest, ended, outcomes = asyncio.run(go())
    assert tuple(has + [t for p in rest for t in p.token_ids]) == expected
    assert rest[-1].finish_reason is FinishReason.LENGTH and rest[-1].completion_tokens == 24
    assert outcomes["length"] == 1
    assert (outcomes["taken_over"], outcomes["rerun"]) == ((1, 0) if still_running else (0, 1))
    if still_running:
        assert isinstance(ended, TakenOver) and "router-b" in str(ended) and outcomes["a_taken_over"] == 1
