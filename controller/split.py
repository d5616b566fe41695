"""Choosing (prefill, decode) for a number of workers: the split whose busier pool is least loaded.

    load_p(P)      = need_p / P          1.0 = the pool is exactly at its SLO-safe load
    load_d(D)      = need_d / D
    bottleneck     = max(load_p(P), load_d(N - P))
    best split     = argmin over P in [max(min_prefill, N - max_decode), min(N - min_decode, max_prefill)]
                     of the bottleneck

load_p falls and load_d rises with P, so the best P sits where they cross, next to the proportional split
P = round(N * need_p / (need_p + need_d)), which is reported alongside. Ties go to the split nearest the current one,
so equal options never cause a move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.controller.config import ControllerConfig

TIE = 1e-9
OVERLOADED = 1.0
"""A pool's load above which its SLO cannot be met on average: the needs are in workers at the SLO-safe load, so
this is 1 by their definition."""


def pool_load(need: float, size: int) -> float:
    """need / size; a pool of none is infinitely loaded if anything needs it."""
    if size <= 0:
        return math.inf if need > 0 else 0.0
    return need / size


@dataclass(frozen=True)
class Split:
    prefill: int
    decode: int
    prefill_load: float
    decode_load: float

    @property
    def sizes(self) -> tuple[int, int]:
        return self.prefill, self.decode

    @property
    def total(self) -> int:
        return self.prefill + self.decode

    @property
    def bottleneck(self) -> float:
        return max(self.prefill_load, self.decode_load)


def evaluate(need_p: float, need_d: float, sizes: tuple[int, int]) -> Split:
    return Split(sizes[0], sizes[1], pool_load(need_p, sizes[0]), pool_load(need_d, sizes[1]))


def best_split(config: ControllerConfig, need_p: float, need_d: float, total: int,
               current: tuple[int, int]) -> Split | None:
    """The split of `total` workers with the lowest bottleneck; None when no split of `total` keeps each pool within
    its bounds (min_prefill..max_prefill, min_decode..max_decode)."""
    best: Split | None = None
    for prefill in config.prefill_range(total):
        split = evaluate(need_p, need_d, (prefill, total - prefill))
        if best is None or split.bottleneck < best.bottleneck - TIE or (
                split.bottleneck <= best.bottleneck + TIE
                and abs(prefill - current[0]) < abs(best.prefill - current[0])):
            best = split
    return best


def proportional_prefill(config: ControllerConfig, need_p: float, need_d: float, total: int) -> float:
    """round(N * need_p / (need_p + need_d)), clamped to the minimums (NaN when nothing is needed)."""
    if need_p + need_d <= 0:
        return math.nan
    prefill = round(total * need_p / (need_p + need_d))
    return float(min(max(prefill, config.min_prefill), total - config.min_decode))


def gain(current: Split, target: Split) -> float:
    """How much the bottleneck falls from current to target (infinite when only the current one is overloaded to
    infinity, 0 when both are)."""
    if math.isinf(current.bottleneck):
        return 0.0 if math.isinf(target.bottleneck) else math.inf
    return current.bottleneck - target.bottleneck
