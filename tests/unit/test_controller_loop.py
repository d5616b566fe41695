"""The live controller adapter's arrivals: rate and prompt length over the traffic window, like the finished
lengths they are combined with."""

import math

from pdserve.cluster.controller_loop import ControllerLoop, RouterCounts
from pdserve.controller.config import ControllerConfig


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
