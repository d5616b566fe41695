"""The live controller adapter's arrival rate: over the traffic window, like the lengths it is combined with."""

from pdserve.cluster.controller_loop import ControllerLoop, RouterCounts
from pdserve.controller.config import ControllerConfig


def _loop(window_s: float) -> ControllerLoop:
    config = ControllerConfig(slo_ttft_s=1.0, slo_tpot_s=0.05)
    return ControllerLoop(config, model=None, registry=None, pool=None, router_counts=lambda: RouterCounts(0, 0),
                          window_s=window_s, dry_run=True)


def test_arrival_rate_is_averaged_over_the_window_not_the_last_tick():
    loop = _loop(window_s=20.0)
    assert loop._arrival_rate(0.0, 0) == 0.0  # nothing to compare with yet
    total = 0
    for t in range(3, 31, 3):  # 10 req/s, then a quiet tick at the end
        total += 30 if t < 30 else 0
        rate = loop._arrival_rate(float(t), total)
    # the last 3 s had no arrivals; the 20 s window still says ~9 req/s, where a per-tick rate would say 0
    assert 8.0 < rate < 10.0


def test_arrival_rate_forgets_what_left_the_window():
    loop = _loop(window_s=10.0)
    loop._arrival_rate(0.0, 0)
    loop._arrival_rate(5.0, 500)  # a burst long ago
    for t in range(10, 41, 5):
        rate = loop._arrival_rate(float(t), 500 + (t - 5) * 2)  # then 2 req/s
    assert rate == 2.0
