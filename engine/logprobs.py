"""Log-probabilities of sampled tokens, for requests that ask (`SamplingParams.logprobs`): the model's own, from
the raw logits (before penalties, bias, temperature and the top-k/top-p/min-p filters, as vLLM reports them by
default), for the token picked and the `logprobs` most likely alternatives.

    sampled = runner.run(chunks)        # request id -> Sampled(token_id, logprobs or None)

The types only (the router and workers pass them on without torch); `engine.sampler.logprobs_of` computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_TOP_LOGPROBS = 20
"""Alternatives per token at most (OpenAI's bound)."""


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """The most likely tokens and their logprobs, most likely first (as many as asked for)."""


@dataclass(frozen=True)
class Sampled:
    """One request's token from a step."""

    token_id: int
    logprobs: TokenLogprobs | None = None
    more: tuple[int, ...] = ()
    """A speculative chunk's further tokens, after `token_id` (`engine.prompt_lookup.verify`, `engine.rejection`)."""
    proposed: int = 0
    """A speculative chunk's proposals, of which `len(more)` were kept."""
    picks: tuple[int, ...] = ()
    """A lookahead chunk's greedy token after each of its rows (`engine.lookahead`)."""


@dataclass(frozen=True)
class StepResult:
    sampled: dict[str, Sampled]
    """Request id -> its token, for the chunks that sample."""
    prompt_logprobs: dict[str, tuple[TokenLogprobs, ...]]
    """Request id -> the logprobs of the prompt tokens its chunk predicts (`ScheduledChunk.prompt_targets`)."""
