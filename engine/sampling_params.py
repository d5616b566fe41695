"""Per-request sampling parameters, validated at the boundary."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.engine.structured_output import StructuredOutput

GREEDY_BELOW = 1e-5


class SamplingError(ValueError):
    """A sampling parameter is out of range; the message names the field."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 (or below 1e-5) is greedy (argmax). top_k 0, top_p 1 and min_p 0 switch those filters off. With a
    seed the same request gives the same tokens on any worker, in any batch, after any preemption: each token's
    randomness is drawn from (seed, output position).

    The logits are adjusted before temperature and the filters (as vLLM and OpenAI define them; `engine.sampler`):
    `repetition_penalty` divides the positive logits (multiplies the negative ones) of every token in the prompt or
    the output; `frequency_penalty` x (times the token is in the output) and `presence_penalty` x (whether it is)
    are subtracted; `logit_bias` is added; tokens outside `allowed_token_ids` (when given) are masked, and so are the
    stop tokens (EOS and `stop_token_ids`) until the output has `min_tokens`. Greedy decoding sees them too.
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    min_p: float = 0.0
    """Drop tokens less likely than min_p x the most likely one's probability."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits."""
    allowed_token_ids: tuple[int, ...] = ()
    """When given, only these tokens may be sampled."""
    logprobs: int | None = None
    """Report each output token's logprob and this many most likely alternatives (0: the token's alone)."""
    prompt_logprobs: int | None = None
    """Report each prompt token's logprob (given the tokens before it; the first has none) and this many
    alternatives. Such a request computes its whole prompt (no prefix cache)."""
    structured_output: StructuredOutput | None = None
    """What the output must match (a JSON schema, a regex, a choice, a grammar): tokens that would break it are
    masked before sampling, and the request stops when it is complete (`engine.structured_output`)."""

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
        self._check_adjustments()

    def _check_adjustments(self) -> None:
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in dict(self.logit_bias).items()))
        object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise SamplingError(f"{name}: must be in [-2, 2], got {getattr(self, name)!r}")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10):
            raise SamplingError(f"repetition_penalty: must be in (0, 10], got {self.repetition_penalty!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingError(f"min_p: must be in [0, 1], got {self.min_p!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or \
                not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingError(f"min_tokens: must be an integer in [0, max_tokens ({self.max_tokens})], got "
                                f"{self.min_tokens!r}")
        for token, bias in self.logit_bias:
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise SamplingError(f"logit_bias: token {token} with bias {bias}: ids must be >= 0 and biases in "
                                    "[-100, 100]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20):
                raise SamplingError(f"{name}: must be an integer in [0, 20], got {value!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.allowed_token_ids):
            raise SamplingError(f"allowed_token_ids: must be non-negative integers, got {self.allowed_token_ids!r}")
        from pdserve.engine.structured_output import StructuredOutput

        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            raise SamplingError(f"structured_output: expected StructuredOutput, got {self.structured_output!r}")

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits are changed before sampling (penalties, bias, allowed tokens, min_tokens)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.allowed_token_ids or self.min_tokens)

    @property
    def needs_history(self) -> bool:
        """The penalties read the tokens so far."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 are greedy: dividing logits by them overflows (as vLLM does)."""
        return self.temperature < GREEDY_BELOW
