"""The live controller adapter: arrivals (rate and prompt length over the traffic window, like the finished
lengths they are combined with) and how it reports workers in transition."""

import math

from pdserve.cluster.controller_loop import ControllerLoop, RouterCounts, _worker
from pdserve.cluster.registry import Role, WorkerInfo, WorkerState
from pdserve.controller.config import ControllerConfig
from pdserve.controller.observation import PoolRole


def _loop(window_s: float) -> ControllerLoop:
    config = ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05)
    return ControllerLoop(config, model=None, registry=None, pool=None, router_counts=lambda: RouterCounts(0, 0),
                          window_s=window_s, dry_run=True)


def test_arrival_rate_is_averaged_over_the_window_not_the_last_tick():
    loop = _loop(window_s=20.0)
    rate, prompt, _ = loop._arrivals(0.0, RouterCounts(0, 0))
    assert rate == 0.0 and math.isnan(prompt)  # nothing to compare with yet
    total = 0
    for t in range(3, 31, 3):  # 10 req/s, then a quiet tick at the end
        total += 30 if t < 30 else 0
        rate, _, _ = loop._arrivals(float(t), RouterCounts(total, 0, total * 100))
    # the last 3 s had no arrivals; the 20 s window still says ~9 req/s, where a per-tick rate would say 0
    assert 8.0 < rate < 10.0


def test_arrivals_forget_what_left_the_window():
    loop = _loop(window_s=10.0)
    loop._arrivals(0.0, RouterCounts(0, 0, 0))
    loop._arrivals(5.0, RouterCounts(500, 0, 500 * 4000))  # a burst of long prompts long ago
    for t in range(10, 41, 5):
        total = 500 + (t - 5) * 2  # then 2 req/s of 300-token prompts
        rate, prompt, _ = loop._arrivals(float(t), RouterCounts(total, 0, 500 * 4000 + (total - 500) * 300))
    assert rate == 2.0
    assert prompt == 300.0


def test_workers_in_transition_say_which_pool_they_are_joining():
    # moved by the controller: the pool it was sent to; still starting: the pool it registered in; drained by an
    # operator (`pdserve drain`): leaving, for no known pool; ready: not in transition at all.
    def info(worker_id: str, role: Role, state: WorkerState) -> WorkerInfo:
        return WorkerInfo(worker_id, role, actor_name=worker_id, pid=1, state=state)

    moved = _worker(info("w0", Role.DECODE, WorkerState.DRAINING), PoolRole.PREFILL)
    starting = _worker(info("w1", Role.PREFILL, WorkerState.STARTING), None)
    drained = _worker(info("w2", Role.DECODE, WorkerState.DRAINING), None)
    ready = _worker(info("w3", Role.DECODE, WorkerState.READY), None)
    assert (moved.draining, moved.joining) == (True, PoolRole.PREFILL)
    assert (starting.draining, starting.joining) == (True, PoolRole.PREFILL)
    assert (drained.draining, drained.joining) == (True, None)
    assert (ready.draining, ready.joining) == (False, None)
