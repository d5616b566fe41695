"""Log-probabilities of sampled tokens, for requests that ask (`SamplingParams.logprobs`): the model's own, from
the raw logits (before penalties, bias, temperature and the top-k/top-p/min-p filters, as vLLM reports them by
default), for the token picked and the `logprobs` most likely alternatives.

    sampled = runner.run(chunks)        # request id -> Sampled(token_id, logprobs or None)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


def logprobs_of(logits: torch.Tensor, token_ids: Sequence[int], top: Sequence[int]) -> list[TokenLogprobs]:
    """logits: [R, V] raw fp32; the token picked in each row and how many alternatives it wants -> one entry per
    row (one host sync for all)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    picked = logprobs.gather(1, torch.tensor(token_ids, device=logits.device)[:, None])[:, 0].tolist()  # [R]
    k = max(top, default=0)
    best_values, best_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    best_values, best_ids = best_values.tolist(), best_ids.tolist()
    return [TokenLogprobs(token, value, tuple(zip(best_ids[r][:n], best_values[r][:n])))
            for r, (token, value, n) in enumerate(zip(token_ids, picked, top))]
