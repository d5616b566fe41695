"""How fast one worker is, and how hard it can be driven before an SLO breaks.

`PerfModel` is the only thing the controller knows about the hardware. `pdserve.engine.cost_model.CostModel`
implements it from a profile; tests use a made-up linear one. The two helpers turn it into per-worker capacity:

Prefill, one worker as an M/D/1 queue (Poisson arrivals, fixed service time S = prefill_seconds(ISL)):

    mean wait   W(rho) = rho * S / (2 * (1 - rho))
    TTFT        S + W(rho) <= slo_ttft
    =>          rho <= 2 * (slo_ttft - S) / (2 * slo_ttft - S)          (solve the line above for rho)
    u_p       = clamp(that, floor, cap)

The floor applies when S is close to or above the SLO (the formula would ask for a nearly idle pool, which no number
of workers fixes: batching several prompts per step is what helps then); the cap keeps headroom for bursts.

Decode, one worker running a batch of B requests, each with context ctx:

    B*  = the largest B <= batch_cap with decode_step_seconds(B, ctx) * tpot_correction <= slo_tpot
    throughput = B* / (decode_step_seconds(B*, ctx) * tpot_correction)     tokens per second per worker

The step time is assumed not to fall as the batch grows, so B* is found by bisection. If even B = 1 misses the SLO,
B* = 1 and the caller says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class PerfModel(Protocol):
    """Predicted times on one worker, without queueing."""

    def prefill_seconds(self, prompt_tokens: int) -> float:
        """Prefill of one prompt alone on one prefill worker."""
        ...

    def decode_step_seconds(self, batch: int, context_len: int) -> float:
        """One decode step of `batch` requests, each with `context_len` tokens of context."""
        ...


def md1_wait(rho: float, service_s: float) -> float:
    """Mean queueing wait of an M/D/1 queue at utilisation `rho` (infinite at rho >= 1)."""
    if rho >= 1.0:
        return math.inf
    return max(rho, 0.0) * service_s / (2.0 * (1.0 - rho))


def prefill_max_utilisation(service_s: float, slo_ttft_s: float, floor: float, cap: float) -> tuple[float, bool]:
    """The highest utilisation at which S + W(rho) still meets the TTFT SLO, clamped to [floor, cap].

    Returns (u_p, slo_reachable); slo_reachable is False when the formula fell below the floor.
    """
    headroom = slo_ttft_s - service_s
    rho = 2.0 * headroom / (2.0 * slo_ttft_s - service_s) if headroom > 0 else 0.0
    return min(max(rho, floor), cap), rho >= floor


@dataclass(frozen=True)
class DecodeCapacity:
    """What one decode worker can carry at the TPOT SLO."""

    batch: int
    """B*: the largest batch that meets the SLO (at least 1)."""
    batch_cap: int
    """The batch limit from max_num_seqs and KV memory."""
    step_s: float
    """Corrected step time at B*."""
    tokens_per_s: float
    """B* / step_s."""
    slo_reachable: bool
    """False when even a batch of 1 misses the TPOT SLO."""


def decode_capacity(model: PerfModel, context_len: int, batch_cap: int, slo_tpot_s: float,
                    correction: float) -> DecodeCapacity:
    """B* by bisection over [1, batch_cap], and the throughput it gives."""
    batch_cap = max(batch_cap, 1)

    def step(batch: int) -> float:
        return model.decode_step_seconds(batch, context_len) * correction

    if step(1) > slo_tpot_s:
        return DecodeCapacity(1, batch_cap, step(1), 1.0 / step(1), False)
    lo, hi = 1, batch_cap  # step(lo) meets the SLO; find the largest such batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if step(mid) <= slo_tpot_s:
            lo = mid
        else:
            hi = mid - 1
    return DecodeCapacity(lo, batch_cap, step(lo), lo / step(lo), True)
