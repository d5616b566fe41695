"""A worker switching roles in place (`worker_actor`): the same engine serves the other role under a new id, and
requests through it stay token-identical to one engine. Without Ray: workers in this process, KV over the
in-process connector, random SmolLM2-shaped weights."""

import asyncio

import pytest

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine import SamplingParams
from pdserve.kv_transfer.in_process import Exchange, InProcessConnector
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve.registry.entries import Role, WorkerState
from pdserve.worker.messages import DecodeTask, Owner, PrefillTask
from pdserve.worker.runtime import WorkerSpec
from pdserve.worker_actor import RoleSwitchError, Worker, WrongRole

from .test_workers_in_process import (  # noqa: F401
    CONFIG,
    PROMPT,
    LocalPeers,
    events_until_finished,
    handed_off,
    idle,
    oracle,
    started_pair,
)

SAMPLING = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


async def handoff(prefill: PrefillWorker, decode: DecodeWorker, request_id: str) -> tuple[int, ...]:
    await handed_off(prefill, decode, request_id, SAMPLING)
    events = await events_until_finished(decode, request_id)
    return tuple(t for e in events for t in e.token_ids)


async def switched(worker: PrefillWorker | DecodeWorker, worker_id: str, role: Role, exchange: Exchange,
                   peers: LocalPeers):
    """What `Worker.switch_role` does, with an in-process connector for the new identity."""
    await worker.drain()
    assert await worker.idle()
    thread = await worker.leave()
    connector = InProcessConnector(worker_id, exchange)
    if role is Role.PREFILL:
        new = PrefillWorker(WorkerSpec(worker_id, role, CONFIG), connector, thread=thread, peers=peers)
    else:
        new = peers.workers[worker_id] = DecodeWorker(WorkerSpec(worker_id, role, CONFIG), connector, thread=thread)
    await new.start()
    return new


def test_both_workers_swap_roles_in_place_and_stay_token_identical(oracle):  # noqa: F811
    expected = oracle.generate([list(PROMPT)], SAMPLING)[0].token_ids

    async def go():
        prefill, decode = await started_pair()
        exchange, peers = prefill.runtime.connector.exchange, prefill.peers
        before = await handoff(prefill, decode, "r1")
        engines = prefill.runtime.engine, decode.runtime.engine
        new_decode = await switched(prefill, "decode-1", Role.DECODE, exchange, peers)
        new_prefill = await switched(decode, "prefill-1", Role.PREFILL, exchange, peers)
        assert (new_prefill.runtime.engine, new_decode.runtime.engine) == engines[::-1]  # no engine was rebuilt
        assert prefill.runtime.state is WorkerState.STOPPED and new_decode.runtime.state is WorkerState.READY
        after = await handoff(new_prefill, new_decode, "r2")
        assert await idle(new_prefill, new_decode)  # every block free on both engines
        for worker in (new_prefill, new_decode):
            await worker.stop()
        return before, after

    before, after = asyncio.run(go())
    assert before == after == expected


def test_the_actor_switches_only_when_drained_and_refuses_the_other_roles_work():
    async def go():
        worker = Worker(WorkerSpec("decode-0", Role.DECODE, CONFIG))
        await worker.start()
        engine = worker.front.runtime.engine
        task = PrefillTask("r1", PROMPT, SAMPLING, "decode-0", 1)
        try:
            with pytest.raises(RoleSwitchError, match="decode-0 is ready"):
                await worker.switch_role(WorkerSpec("prefill-0", Role.PREFILL, CONFIG))
            with pytest.raises(WrongRole, match="prefill: worker decode-0 is not a prefill worker"):
                await worker.prefill(task)
            await worker.drain()
            info = await worker.switch_role(WorkerSpec("prefill-0", Role.PREFILL, CONFIG))
            assert (info.worker_id, info.role, info.state) == ("prefill-0", Role.PREFILL, WorkerState.READY)
            assert worker.front.runtime.engine is engine
            assert (await worker.info()).worker_id == "prefill-0"
            with pytest.raises(WrongRole, match="reserve: worker prefill-0 is not a decode worker"):
                await worker.reserve(DecodeTask("r1", PROMPT, SAMPLING, Owner("router-a", "r1"), "prefill-9"))
            # What a router may still send to the decode worker this actor was: nothing there, and no error.
            assert await worker.events("router-a", 0.01) == []
            await worker.abort_decode("r1", "router-a")
            assert await worker.adopt("r1", "router-a", 0, "") is None
            await worker.abort_prefill("r1")
        finally:
            await worker.stop()

    asyncio.run(go())


def test_a_worker_drained_while_it_starts_stays_draining():
    """A scale-down or `pdserve drain` can pick a worker still loading its model (one the controller is adding):
    its start used to set READY over the drain, and the drained worker took traffic."""
    from pdserve.engine import EngineConfig

    worker = Worker(WorkerSpec("decode-3", Role.DECODE, EngineConfig(backend="sim", model="tiny")))

    async def go():
        start = asyncio.create_task(worker.start())
        await asyncio.sleep(0)
        await worker.drain()
        await start
        state = (await worker.info()).state
        await worker.stop()
        return state

    assert asyncio.run(go()) is WorkerState.DRAINING
