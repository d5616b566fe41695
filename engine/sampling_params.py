"""Per-request sampling parameters, validated at the boundary."""

from __future__ import annotations

import math
from dataclasses import dataclass

GREEDY_BELOW = 1e-5


class SamplingError(ValueError):
    """A sampling parameter is out of range; the message names the field."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 (or below 1e-5) is greedy (argmax). top_k 0 and top_p 1 switch those filters off. With a seed the
    same request gives the same tokens on any worker, in any batch, after any preemption: each token's randomness is
    drawn from (seed, output position).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Stop strings: the output text ends just before the first one."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the request (as the model's EOS does); they are not part of the text."""
    ignore_eos: bool = False
    """Keep going past the model's EOS (for benchmarks)."""

    def __post_init__(self) -> None:
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
                raise SamplingError(f"{name}: must be a list, got {type(value).__name__} {value!r}")
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise SamplingError(f"max_tokens: must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature: must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k: must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise SamplingError(f"seed: must be an integer >= 0, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError(f"stop: every stop string must be a non-empty string, got {self.stop!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise SamplingError(f"stop_token_ids: must be non-negative integers, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 are greedy: dividing logits by them overflows (as vLLM does)."""
        return self.temperature < GREEDY_BELOW
