"""The traffic window from finished requests: what both adapters (live and simulated) hand to `tick`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.controller.observation import TrafficWindow
from pdserve.controller.output_lengths import class_means


@dataclass(frozen=True)
class Finished:
    """One request that finished in the window."""

    input_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float


def traffic_window(finished: Sequence[Finished], arrival_rate: float, window_s: float, slo_ttft_s: float,
                   slo_tpot_s: float, router_waiting: int = 0, arrived_input_tokens: float = math.nan,
                   arrived_by_class: tuple[int, ...] = ()) -> TrafficWindow:
    """Lengths, TTFT/TPOT p50 and p90 and SLO attainment of the window's finished requests, with the arrival rate
    and the arrivals' prompt lengths passed through."""
    if not finished:
        nan = math.nan
        return TrafficWindow(window_s, arrival_rate, 0, nan, nan, nan, nan, nan, nan, nan, router_waiting,
                             arrived_input_tokens, arrived_by_class)
    ttft = sorted(f.ttft_s for f in finished)
    tpot = sorted(f.tpot_s for f in finished)
    met = sum(1 for f in finished if f.ttft_s <= slo_ttft_s and f.tpot_s <= slo_tpot_s)
    n = len(finished)
    return TrafficWindow(
        window_s=window_s, arrival_rate=arrival_rate, finished=n,
        mean_input_tokens=sum(f.input_tokens for f in finished) / n,
        mean_output_tokens=sum(f.output_tokens for f in finished) / n,
        ttft_p50_s=_quantile(ttft, 0.5), ttft_p90_s=_quantile(ttft, 0.9), tpot_p50_s=_quantile(tpot, 0.5),
        tpot_p90_s=_quantile(tpot, 0.9), attainment=met / n, router_waiting=router_waiting,
        arrived_input_tokens=arrived_input_tokens, arrived_by_class=arrived_by_class,
        finished_by_class=class_means((f.input_tokens, f.output_tokens) for f in finished))


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def finished_requests(timings: list[dict[str, str]]) -> list[Finished]:
    """The registry's timings stream entries of requests that completed (not aborted) as window rows."""
    return [Finished(int(t["prompt_tokens"]), int(t["completion_tokens"]), float(t["ttft_s"]), float(t["tpot_s"]))
            for t in timings if t.get("finish_reason") in ("stop", "length")]
