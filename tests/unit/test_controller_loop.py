"""The live controller adapter: arrivals (rate and prompt length over the traffic window, like the finished
lengths they are combined with, summed over every router's counters) and how it reports workers in transition."""

import asyncio
import json
import math
from types import SimpleNamespace

from pdserve.control_plane.controller_loop import ControllerLoop, _worker
from pdserve.control_plane.scaler import ScaleError
from pdserve.controller.config import ControllerConfig
from pdserve.controller.decision import Action, Decision
from pdserve.controller.observation import Observation, PoolRole
from pdserve.registry.entries import Role, RouterInfo, WorkerInfo, WorkerState


def _loop(window_s: float) -> ControllerLoop:
    config = ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05)
    return ControllerLoop(config, policy=None, registry=None, scaler=SimpleNamespace(pool=None), window_s=window_s,
                          dry_run=True)


def counts(total: int, prompt_tokens: int = 0, router_id: str = "router-a",
           by_class: tuple[int, ...] = ()) -> dict[str, RouterInfo]:
    """One router's entry in the registry with these counters (what `_arrivals` reads each tick)."""
    return {router_id: RouterInfo(router_id, "127.0.0.1:1", 1, accepted_total=total,
                                  accepted_prompt_tokens=prompt_tokens, accepted_by_class=by_class)}


def test_arrival_rate_is_averaged_over_the_window_not_the_last_tick():
    loop = _loop(window_s=20.0)
    rate, prompt, _ = loop._arrivals(0.0, counts(0))
    assert rate == 0.0 and math.isnan(prompt)  # nothing to compare with yet
    total = 0
    for t in range(3, 31, 3):  # 10 req/s, then a quiet tick at the end
        total += 30 if t < 30 else 0
        rate, _, _ = loop._arrivals(float(t), counts(total, total * 100))
    # the last 3 s had no arrivals; the 20 s window still says ~9 req/s, where a per-tick rate would say 0
    assert 8.0 < rate < 10.0


def test_arrivals_forget_what_left_the_window():
    loop = _loop(window_s=10.0)
    loop._arrivals(0.0, counts(0))
    loop._arrivals(5.0, counts(500, 500 * 4000))  # a burst of long prompts long ago
    for t in range(10, 41, 5):
        total = 500 + (t - 5) * 2  # then 2 req/s of 300-token prompts
        rate, prompt, _ = loop._arrivals(float(t), counts(total, 500 * 4000 + (total - 500) * 300))
    assert rate == 2.0
    assert prompt == 300.0


def test_arrivals_add_up_over_routers_and_a_restarted_router_counts_from_zero():
    """Router a serves 2 req/s throughout; router b (1 req/s) is killed at t=10 and comes back as router c, whose
    counters start again from 0: the rate over the window stays 3 req/s, never negative, never double."""
    loop = _loop(window_s=10.0)
    rates = []
    for t in range(0, 21):
        routers = counts(2 * t, 2 * t * 100, "router-a", (2 * t, 0))
        if t < 10:
            routers |= counts(t, t * 300, "router-b", (0, t))
        elif t > 10:
            routers |= counts(t - 10, (t - 10) * 300, "router-c", (0, t - 10))
        rate, prompt, classes = loop._arrivals(float(t), routers)
        rates.append(rate)
    assert all(r >= 0 for r in rates) and 2.8 < rates[-1] <= 3.0
    assert classes == (20, 10) and 150 < prompt < 200  # the last 10 s: 20 from a, 10 from c since its start


def test_workers_in_transition_say_which_pool_they_are_joining():
    # moved by the controller: the pool it was sent to; still starting: the pool it registered in; drained by an
    # operator (`pdserve drain`): in transition for no known pool; removed by the controller: leaving, whatever
    # its registry state; ready: not in transition at all.
    def info(worker_id: str, role: Role, state: WorkerState) -> WorkerInfo:
        return WorkerInfo(worker_id, role, actor_name=worker_id, pid=1, state=state)

    moved = _worker(info("w0", Role.DECODE, WorkerState.DRAINING), PoolRole.PREFILL, False)
    starting = _worker(info("w1", Role.PREFILL, WorkerState.STARTING), None, False)
    drained = _worker(info("w2", Role.DECODE, WorkerState.DRAINING), None, False)
    ready = _worker(info("w3", Role.DECODE, WorkerState.READY), None, False)
    removed = _worker(info("w4", Role.DECODE, WorkerState.READY), None, True)  # the drain not yet registered
    assert (moved.draining, moved.joining, moved.leaving) == (True, PoolRole.PREFILL, False)
    assert (starting.draining, starting.joining, starting.leaving) == (True, PoolRole.PREFILL, False)
    assert (drained.draining, drained.joining, drained.leaving) == (True, None, False)
    assert (ready.draining, ready.joining, ready.leaving) == (False, None, False)
    assert (removed.draining, removed.joining, removed.leaving) == (True, None, True)


# --- acting on adds and removes (a fake registry and scaler; the live path is tests/integration) ------------------


class FakeRegistry:
    def __init__(self, workers: list[WorkerInfo]) -> None:
        self.worker_list = workers
        self.decisions: list[dict] = []

    def workers(self) -> list[WorkerInfo]:
        return list(self.worker_list)

    def timings_since(self, window_s: float) -> list:
        return []

    def pin(self) -> None:
        return None

    def routers(self) -> list:
        return []

    def append_decision(self, text: str, dry_run: bool) -> None:
        self.decisions.append(json.loads(text))


class FakeScaler:
    """Plans a worker id per add; `start_added` waits on `release` and then fails or succeeds as told."""

    def __init__(self, fail: str = "") -> None:
        self.pool = SimpleNamespace(specs={}, moving=set())
        self.fail = fail
        self.release = asyncio.Event()
        self.started: list[str] = []
        self.removed: list[str] = []

    def plan_adds(self, roles: list[Role]) -> list[SimpleNamespace]:
        return [SimpleNamespace(worker_id=f"{role.value}-{9 + i}", role=role) for i, role in enumerate(roles)]

    async def start_added(self, spec, timeout_s: float) -> None:
        await self.release.wait()
        if self.fail:
            raise ScaleError(self.fail)
        self.started.append(spec.worker_id)

    async def remove(self, worker_id: str) -> None:
        self.removed.append(worker_id)


class ScriptedPolicy:
    def __init__(self, *decisions: Decision) -> None:
        self.decisions = list(decisions)
        self.seen: list[Observation] = []

    def tick(self, observation: Observation) -> Decision:
        self.seen.append(observation)
        if self.decisions:
            return self.decisions.pop(0)
        return Decision(observation.now_s, Action.HOLD, observation.sizes, observation.sizes, reason="hold")


def ready(worker_id: str, role: Role) -> WorkerInfo:
    return WorkerInfo(worker_id, role, actor_name=worker_id, pid=1, state=WorkerState.READY)


def live_loop(policy, scaler: FakeScaler, registry: FakeRegistry, **budget) -> ControllerLoop:
    config = ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05, **({"min_workers": 2, "max_workers": 3} | budget))
    return ControllerLoop(config, policy, registry, scaler, window_s=10.0, dry_run=False, add_timeout_s=5.0)


def test_an_add_in_flight_counts_as_joining_its_pool_and_a_failed_one_is_recorded():
    async def go():
        registry = FakeRegistry([ready("prefill-0", Role.PREFILL), ready("decode-0", Role.DECODE)])
        scaler = FakeScaler(fail="decode-9: not placed and started within 5 s (add_timeout_s)")
        add = Decision(0.0, Action.ADD, (1, 1), (1, 2), add=(PoolRole.DECODE,), reason="queue")
        policy = ScriptedPolicy(add)
        loop = live_loop(policy, scaler, registry)
        await loop.tick_once()
        await loop.tick_once()  # the add is still starting
        starting = [w for w in policy.seen[1].workers if w.worker_id == "decode-9"]
        assert starting and starting[0].draining and starting[0].joining is PoolRole.DECODE
        scaler.release.set()
        await asyncio.sleep(0.05)
        assert not loop._adding and not scaler.started
        return registry.decisions

    decisions = asyncio.run(go())
    assert [d["action"] for d in decisions] == ["add", "hold", "hold"]
    assert decisions[-1]["reason"].startswith("Adding decode-9 failed: decode-9: not placed")


def test_what_breaks_the_budget_is_recorded_as_refused_and_not_done():
    async def go():
        registry = FakeRegistry([ready("prefill-0", Role.PREFILL), ready("decode-0", Role.DECODE)])
        scaler = FakeScaler()
        remove = Decision(0.0, Action.REMOVE, (1, 1), (1, 0), remove=("decode-0",), reason="quiet")
        loop = live_loop(ScriptedPolicy(remove), scaler, registry)
        await loop.tick_once()
        await asyncio.sleep(0)
        return registry.decisions, scaler.removed

    decisions, removed = asyncio.run(go())
    assert not removed
    assert decisions[0]["action"] == "hold" and decisions[0]["reason"].startswith("Refused: removing 1 of 2 workers")


def test_a_worker_the_watch_is_starting_counts_as_joining_its_pool_before_it_registers():
    """A replacement loading its model is not in the registry yet: counted nowhere, the policy added past
    max_workers for a slot already being filled."""
    async def go():
        registry = FakeRegistry([ready("prefill-0", Role.PREFILL), ready("decode-0", Role.DECODE)])
        scaler = FakeScaler()
        scaler.pool.specs = {w: SimpleNamespace(role=r) for w, r in (("prefill-0", Role.PREFILL),
                                                                     ("decode-0", Role.DECODE),
                                                                     ("decode-1", Role.DECODE))}
        policy = ScriptedPolicy()
        await live_loop(policy, scaler, registry).tick_once()
        return policy.seen[0]

    seen = asyncio.run(go())
    replacement = [w for w in seen.workers if w.worker_id == "decode-1"]
    assert replacement and replacement[0].draining and replacement[0].joining is PoolRole.DECODE
    assert len(seen.workers) == 3
