"""The changes a request's sampling parameters make to its logits before a token is picked: penalties for tokens
already seen, a bias per token, a set of allowed tokens, and no stop token before `min_tokens` (definitions in
`SamplingParams`). They apply to greedy and sampled rows alike, before temperature and the top-k/top-p/min-p filters,
in vLLM's order: repetition penalty, frequency and presence penalties, logit bias, allowed tokens, min_tokens.

Rows whose parameters change nothing are left as they are, with no copy; the others are adjusted one by one (few
requests ask for these, and each needs its own token counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenHistory:
    """The tokens a row's penalties read."""

    prompt: Sequence[int]
    """The prompt (a resumed request's output so far excluded)."""
    output: Sequence[int]
    """The output so far (a resumed request's included)."""


def adjust_logits(logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int],
                  histories: Sequence[TokenHistory | None], eos_token_ids: Sequence[int]) -> torch.Tensor:
    """logits: [N, V] fp32 -> the same tensor when no row asks for a change, else an adjusted copy."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        logits[i] = _adjust_row(logits[i], params[i], positions[i], histories[i], eos_token_ids)
    return logits


def _adjust_row(row: torch.Tensor, p: SamplingParams, position: int, history: TokenHistory | None,
                eos_token_ids: Sequence[int]) -> torch.Tensor:
    """row: [V] -> [V]."""
    vocab, device = row.shape[0], row.device
    if p.needs_history and history is not None:
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({*history.prompt, *history.output}), dtype=torch.long, device=device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and len(history.output):
            counts = torch.bincount(torch.tensor(list(history.output), dtype=torch.long, device=device),
                                    minlength=vocab)[:vocab].to(row.dtype)  # [V]
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=device)
        row[ids] += torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype, device=device)
    if p.allowed_token_ids:
        allowed = torch.full_like(row, float("-inf"))
        ids = torch.tensor(p.allowed_token_ids, dtype=torch.long, device=device)
        allowed[ids] = row[ids]
        row = allowed
    if position < p.min_tokens:
        stops = [*p.stop_token_ids, *(() if p.ignore_eos else eos_token_ids)]
        if stops:
            row[torch.tensor(stops, dtype=torch.long, device=device)] = float("-inf")
    return row
