"""The Scaler's choices with a fake worker pool: which workers start and stop, on which cores, and what it
refuses (no Ray, no model)."""

import asyncio

import pytest

from pdserve.config import parse_config
from pdserve.control_plane.scaler import ScaleError, Scaler
from pdserve.control_plane.worker_pool import WorkerPool
from pdserve.registry.entries import Role


class FakePool(WorkerPool):
    """The real pool's ids, engines and names, with workers that start and stop in an instant (no Ray)."""

    def __init__(self, config) -> None:
        super().__init__(config, "test")
        self.started: list[str] = []
        self.removed: list[str] = []

    async def start(self, specs):
        for spec in specs:
            self.specs[spec.worker_id] = spec
            self.started.append(spec.worker_id)

    async def remove(self, worker_id):
        del self.specs[worker_id]
        self.removed.append(worker_id)


def scaler(config: dict, running=None, free=None) -> tuple[Scaler, FakePool]:
    cluster = parse_config(config)
    pool = FakePool(cluster)
    made = Scaler(pool, cluster, "redis://127.0.0.1:1", cores=[0, 1, 2, 3],
                  running=running or (lambda worker_id: 0),
                  free_resources=free or (lambda: {"CPU": 64.0, "GPU": 0.0}))
    asyncio.run(pool.start(made.initial_specs()))
    return made, pool


def test_initial_specs_spread_over_cores_and_stay_on_loopback():
    made, pool = scaler({"workers": {"prefill": {"count": 2}, "decode": {"count": 2}}})
    assert sorted(pool.specs) == ["decode-0", "decode-1", "prefill-0", "prefill-1"]
    assert sorted(s.cores for s in pool.specs.values()) == [(0,), (1,), (2,), (3,)]
    assert {s.host for s in pool.specs.values()} == {"127.0.0.1"}


def test_each_pool_runs_its_own_engine_overrides_on_the_shared_engine():
    made, pool = scaler({"engine": {"num_kv_blocks": 256, "max_num_seqs": 64, "max_num_batched_tokens": 512},
                         "router": {"lease_s": 12},
                         "workers": {"prefill": {"engine": {"max_num_batched_tokens": 2048, "max_num_seqs": 4}},
                                     "decode": {"engine": {"kv_cache_gib": 0.5, "max_num_seqs": 128}}}})
    prefill, decode = pool.specs["prefill-0"], pool.specs["decode-0"]
    assert (prefill.engine.max_num_batched_tokens, prefill.engine.max_num_seqs, prefill.engine.num_kv_blocks) == \
        (2048, 4, 256)
    assert (decode.engine.max_num_batched_tokens, decode.engine.max_num_seqs) == (512, 128)
    assert (decode.engine.num_kv_blocks, decode.engine.kv_cache_gib) == (None, 0.5)  # sized in GiB now
    assert prefill.engine.block_size == decode.engine.block_size and prefill.engine.model == decode.engine.model
    assert prefill.lease_s == decode.lease_s == 12 and prefill.actor_name == "default-prefill-0"


def test_workers_on_a_joined_ray_cluster_take_their_node_address():
    made, pool = scaler({"ray_address": "auto", "redis_url": "redis://10.0.0.1:6379"})
    assert {s.host for s in pool.specs.values()} == {""}


def test_scale_up_uses_the_least_used_cores_and_down_stops_the_least_busy():
    busy = {"decode-0": 5, "decode-1": 0, "decode-2": 2}
    made, pool = scaler({}, running=lambda worker_id: busy.get(worker_id, 0))
    started, stopped = asyncio.run(made.scale({Role.DECODE: 3}))
    assert started == ["decode-1", "decode-2"] and stopped == []
    assert sorted(pool.specs["decode-1"].cores + pool.specs["decode-2"].cores) == [2, 3]
    started, stopped = asyncio.run(made.scale({Role.DECODE: 1}))
    assert started == [] and sorted(stopped) == ["decode-1", "decode-2"]
    assert sorted(pool.specs) == ["decode-0", "prefill-0"]


@pytest.mark.parametrize("wanted, message", [
    ({Role.PREFILL: 0}, "prefill: must be between 1"),
    ({Role.BOTH: 2}, "colocated: a disaggregated cluster has no colocated workers"),
])
def test_scale_refuses_what_would_break_the_cluster(wanted, message):
    made, pool = scaler({})
    with pytest.raises(ScaleError, match=message):
        asyncio.run(made.scale(wanted))
    assert pool.removed == [] and len(pool.started) == 2


def test_scale_refuses_what_ray_cannot_place():
    made, pool = scaler({}, free=lambda: {"CPU": 1.0})
    with pytest.raises(ScaleError, match="decode: 2 more worker.*need 2 CPUs.*has 1 CPUs"):
        asyncio.run(made.scale({Role.DECODE: 3}))
    assert len(pool.specs) == 2


def test_drain_stops_one_and_replace_starts_one_on_its_cores():
    made, pool = scaler({"workers": {"decode": {"count": 2}}})
    cores = pool.specs["decode-0"].cores
    assert asyncio.run(made.drain("decode-0", replace=True)) == ("decode-0", "decode-2")
    assert pool.specs["decode-2"].cores == cores
    assert asyncio.run(made.drain("decode-1")) == ("decode-1", "")
    assert sorted(pool.specs) == ["decode-2", "prefill-0"]


def test_drain_refuses_an_unknown_worker_and_the_last_of_a_role():
    made, pool = scaler({})
    with pytest.raises(ScaleError, match="no worker 'decode-9'"):
        asyncio.run(made.drain("decode-9"))
    with pytest.raises(ScaleError, match="last prefill worker"):
        asyncio.run(made.drain("prefill-0"))
    assert pool.removed == []


def test_workers_the_controller_is_moving_are_left_alone():
    made, pool = scaler({"workers": {"decode": {"count": 2}}}, running=lambda worker_id: 0)
    pool.moving.add("decode-0")
    with pytest.raises(ScaleError, match="being moved"):
        asyncio.run(made.drain("decode-0"))
    started, stopped = asyncio.run(made.scale({Role.DECODE: 1}))  # decode-1 is the one not moving
    assert stopped == [] and started == []
    started, stopped = asyncio.run(made.scale({Role.DECODE: 2}))
    assert started == ["decode-2"] and "decode-0" in pool.specs


class StuckPool(FakePool):
    """Workers Ray never places: their start never returns."""

    async def start(self, specs, timeout_s=600.0):
        for spec in specs:
            self.specs[spec.worker_id] = spec
        await asyncio.wait_for(asyncio.Event().wait(), timeout_s)

    def abandon(self, worker_id):
        self.specs.pop(worker_id, None)
        self.removed.append(worker_id)


def test_an_add_ray_cannot_place_is_given_up_after_its_timeout_and_named():
    made, pool = scaler({"workers": {"prefill": {"count": 1}, "decode": {"count": 1}}})
    spec, other = made.plan_adds([Role.DECODE, Role.DECODE])
    assert (spec.worker_id, other.worker_id) == ("decode-1", "decode-2")
    assert (spec.cores, other.cores) == ((2,), (3,))  # the least-used cores, counting each other
    stuck = StuckPool(made.config)
    stuck.specs = dict(pool.specs)
    made.pool = stuck
    with pytest.raises(ScaleError, match=r"decode-1: not placed and started within 0.05 s \(add_timeout_s\)"):
        asyncio.run(made.start_added(spec, timeout_s=0.05))
    assert "decode-1" not in stuck.specs and stuck.removed == ["decode-1"]


def test_an_add_this_machine_has_no_room_for_is_refused_at_once():
    made, _ = scaler({"workers": {"prefill": {"count": 1}, "decode": {"count": 1}}},
                     free=lambda: {"CPU": 0.5, "GPU": 0.0})
    with pytest.raises(ScaleError, match="decode: 1 more worker.*need 1 CPUs.*0.5 CPUs"):
        made.plan_adds([Role.DECODE])


class _HungStop:
    """An actor handle whose `stop` never answers (a worker stuck on a peer that is gone)."""

    class _Method:
        def remote(self):
            return asyncio.get_running_loop().create_future()

    stop = _Method()


def test_a_worker_whose_stop_hangs_is_killed_after_the_timeout(monkeypatch):
    from pdserve.control_plane import worker_pool

    killed: list[object] = []
    monkeypatch.setattr(worker_pool, "WORKER_STOP_TIMEOUT_S", 0.2)
    monkeypatch.setattr(worker_pool.ray, "kill", killed.append)
    made, pool = scaler({})
    hung = _HungStop()
    pool.actors["decode-0"] = hung

    asyncio.run(asyncio.wait_for(pool.stop_all(), 5))
    assert killed == [hung] and "decode-0" not in pool.actors and "decode-0" not in pool.specs
