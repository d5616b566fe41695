"""The worker pool with fake actors: its watch replaces a dead worker, and a replacement whose start fails is killed
and its slot tried again later, instead of staying in the pool as a worker that never serves (it answered as STARTING
for good, was never judged hung, and the slot was never filled); a worker that hangs while it drains for a move or a
remove ends the drain, so the watch can replace it (the drain waited for it forever)."""

import asyncio

import pytest
import ray

from pdserve.config import parse_config
from pdserve.control_plane import worker_pool
from pdserve.control_plane.scaler import Scaler
from pdserve.control_plane.worker_pool import WorkerPool
from pdserve.registry.entries import Role, WorkerInfo, WorkerState


class Call:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class FakeActor:
    """`info` and `start` as a worker actor answers them: dead (its actor is gone), or starting, or failing to."""

    def __init__(self, worker_id: str, role: Role, dead: bool = False, start_fails: bool = False) -> None:
        async def info():
            if dead:
                raise ray.exceptions.RayActorError()
            return WorkerInfo(worker_id, role, worker_id, 1, WorkerState.READY)

        async def start():
            if start_fails:
                raise ray.exceptions.RayError("engine build failed")

        self.info, self.start = Call(info), Call(start)


def with_dead_decode_workers(pool: WorkerPool, config) -> None:
    """The pool's first workers, as its config asks, each decode one dead."""
    for spec in Scaler(pool, config, "redis://x", [], free_resources=lambda: {"CPU": 64}).initial_specs():
        pool.specs[spec.worker_id] = spec
        pool.actors[spec.worker_id] = FakeActor(spec.worker_id, spec.role, dead=spec.role is Role.DECODE)


def watch_for(pool: WorkerPool, seconds: float) -> None:
    async def go() -> None:
        task = asyncio.create_task(pool.watch())
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(go())


def test_a_replacement_that_fails_to_start_is_killed_and_its_slot_tried_again(monkeypatch):
    config = parse_config({})
    pool = WorkerPool(config, "test")
    killed, starts = [], []

    def create(spec):
        starts.append(spec.worker_id)
        pool.specs[spec.worker_id] = spec
        pool.actors[spec.worker_id] = FakeActor(spec.worker_id, spec.role, start_fails=len(starts) == 1)

    monkeypatch.setattr(pool, "_create", create)
    monkeypatch.setattr(ray, "kill", killed.append)
    monkeypatch.setattr(worker_pool, "WATCH_INTERVAL_S", 0.05)
    monkeypatch.setattr(worker_pool, "REFILL_RETRY_S", 0.2)
    with_dead_decode_workers(pool, config)
    watch_for(pool, 1.0)
    decode = [w for w in pool.specs if pool.specs[w].role is Role.DECODE]
    assert starts[:2] == ["decode-1", "decode-2"] and len(starts) == 2  # failed once, then started, then no more
    assert decode == ["decode-2"] and pool.hangs.watched("decode-2") and pool.unfilled == {}
    assert len(killed) == 2  # the dead worker, and the replacement that never started


def test_a_worker_that_hangs_while_it_drains_ends_the_drain():
    config = parse_config({"workers": {"hung_after_s": 1}})
    pool = WorkerPool(config, "test")
    spec = Scaler(pool, config, "redis://x", [], free_resources=lambda: {"CPU": 64}).initial_specs()[0]

    async def drain():
        return None

    async def never():
        await asyncio.sleep(3600)

    actor = FakeActor(spec.worker_id, spec.role)
    actor.drain, actor.idle = Call(drain), Call(never)
    pool.specs[spec.worker_id], pool.actors[spec.worker_id] = spec, actor
    pool.hangs.watch(spec.worker_id)  # and no answer comes from here on

    async def go():
        with pytest.raises(TimeoutError, match="hung while draining"):
            await asyncio.wait_for(pool.drain(spec.worker_id), 5)

    asyncio.run(go())


def test_dead_workers_are_replaced_together_not_one_after_another(monkeypatch):
    config = parse_config({"workers": {"decode": {"count": 2}}})
    pool = WorkerPool(config, "test")
    starting, most = set(), []

    def create(spec):
        async def start():
            starting.add(spec.worker_id)
            most.append(len(starting))
            await asyncio.sleep(0.2)
            starting.discard(spec.worker_id)

        pool.specs[spec.worker_id] = spec
        actor = FakeActor(spec.worker_id, spec.role)
        actor.start = Call(start)
        pool.actors[spec.worker_id] = actor

    monkeypatch.setattr(pool, "_create", create)
    monkeypatch.setattr(ray, "kill", lambda actor: None)
    monkeypatch.setattr(worker_pool, "WATCH_INTERVAL_S", 0.05)
    with_dead_decode_workers(pool, config)
    watch_for(pool, 0.6)
    assert max(most) == 2 and sorted(w for w in pool.specs if w.startswith("decode")) == ["decode-2", "decode-3"]
