"""A worker switching roles in place (`cluster.worker`): the same engine serves the other role under a new id, and
requests through it stay token-identical to one engine. Without Ray: workers in this process, KV over the
in-process connector, random SmolLM2-shaped weights."""

import asyncio

import pytest

from pdserve.cluster.messages import DecodeTask, PrefillTask
from pdserve.cluster.registry import Role, WorkerState
from pdserve.cluster.worker import RoleSwitchError, Worker, WrongRole
from pdserve.cluster.worker_runtime import WorkerSpec
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine import SamplingParams
from pdserve.kv_transfer.in_process import Exchange, InProcessConnector
from pdserve.prefill_worker.worker import PrefillWorker

from .test_workers_in_process import CONFIG, PROMPT, events_until_finished, idle, oracle, started_pair  # noqa: F401

SAMPLING = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


async def handoff(prefill: PrefillWorker, decode: DecodeWorker, request_id: str) -> tuple[int, ...]:
    decode_id, prefill_id = decode.runtime.spec.worker_id, prefill.runtime.spec.worker_id
    assert await decode.reserve(DecodeTask(request_id, PROMPT, SAMPLING, prefill_id, tag=1))
    result = await prefill.prefill(PrefillTask(request_id, PROMPT, SAMPLING, decode_id, tag=1))
    await decode.commit(request_id, result.first_token_id)
    events = await events_until_finished(decode, request_id)
    return (result.first_token_id,) + tuple(t for e in events for t in e.token_ids)


async def switched(worker: PrefillWorker | DecodeWorker, worker_id: str, role: Role, exchange: Exchange):
    """What `Worker.switch_role` does, with an in-process connector for the new identity."""
    await worker.drain()
    assert await worker.idle()
    thread = await worker.runtime.leave()
    cls = PrefillWorker if role is Role.PREFILL else DecodeWorker
    new = cls(WorkerSpec(worker_id, role, CONFIG), InProcessConnector(worker_id, exchange), thread=thread)
    await new.start()
    return new


def test_both_workers_swap_roles_in_place_and_stay_token_identical(oracle):  # noqa: F811
    expected = oracle.generate([list(PROMPT)], SAMPLING)[0].token_ids

    async def go():
        prefill, decode = await started_pair()
        exchange = prefill.runtime.connector.exchange
        before = await handoff(prefill, decode, "r1")
        engines = prefill.runtime.engine, decode.runtime.engine
        new_decode = await switched(prefill, "decode-1", Role.DECODE, exchange)
        new_prefill = await switched(decode, "prefill-1", Role.PREFILL, exchange)
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
        task = PrefillTask("r1", PROMPT, SAMPLING, "decode-0", tag=1)
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
                await worker.reserve(DecodeTask("r1", PROMPT, SAMPLING, "prefill-9", tag=1))
            # What a router may still send to the decode worker this actor was: nothing there, and no error.
            assert await worker.events(0.01) == []
            assert await worker.abort("r1", kv_sent=True) is False
            assert await worker.abort("r1", tag=1) is False  # a prefill abort: nothing sent under that tag
        finally:
            await worker.stop()

    asyncio.run(go())
