"""Pick each request's next token from its logits: greedy, or temperature with top-k, top-p and min-p, after the
changes its parameters make to the logits (penalties, bias, allowed tokens, min_tokens: `engine.logits_adjust`) and
its structured-output grammar's mask (`engine.grammar_state`).

Greedy rows take the argmax together; sampled rows are filtered together and draw together from the engine's shared
generator, except a request with a seed: it draws from its own generator, seeded from (seed, output position), so the
draw does not depend on the batch, the worker, or how many times the request was preempted. One host sync a step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.engine.grammar_state import Grammars, GrammarState, PendingMasks, mask_rows
from pdserve.engine.logits_adjust import TokenHistory, adjust_logits
from pdserve.engine.logprobs import TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant, spreads (seed, position) over 63 bits


def seeded_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    mixed = (seed * _MIX + position) & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator(device=device).manual_seed(mixed)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [V] fp32 -> the row as `filter_rows` leaves it."""
    return filter_rows(logits[None], [params])[0]


def filter_rows(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits: [R, V] fp32, one SamplingParams per row -> temperature-scaled logits with tokens outside each row's
    top-k / top-p set to -inf, for all rows at once (one sort, no host sync).

    top-k keeps every token at least as likely as the k-th; top-p then keeps the smallest set of most likely tokens
    whose probability mass reaches p; min-p then drops tokens less likely than min_p x the most likely one."""
    rows, vocab = logits.shape
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    logits = logits / temperature[:, None]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [R, V]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(top_k) < vocab:
        kth_index = torch.tensor(top_k, device=device)[:, None] - 1  # [R, 1]
        kth = sorted_logits.gather(1, kth_index)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    top_p = [p.top_p for p in params]
    if min(top_p) < 1.0:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        limit = torch.tensor(top_p, dtype=probs.dtype, device=device)[:, None]  # [R, 1]
        sorted_logits = sorted_logits.masked_fill(mass_before >= limit, float("-inf"))
    min_p = [p.min_p for p in params]
    if max(min_p) > 0.0:
        probs = torch.softmax(sorted_logits, dim=-1)  # [R, V], most likely first
        floor = probs[:, :1] * torch.tensor(min_p, dtype=probs.dtype, device=device)[:, None]  # [R, 1]
        sorted_logits = sorted_logits.masked_fill(probs < floor, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


class Sampler:
    def __init__(self, seed: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.eos_token_ids: tuple[int, ...] = ()
        """The model's end tokens, masked until a request has its `min_tokens` (the engine sets them)."""
        self.grammars: Grammars | None = None
        """Masks for rows with structured output (the engine sets it when the model has a tokenizer)."""

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams], output_positions: Sequence[int],
               histories: Sequence[TokenHistory | None] | None = None,
               grammars: Sequence[GrammarState | None] | None = None, masks: PendingMasks | None = None) -> list[int]:
        """logits: [N, V] fp32; one SamplingParams, output position, token history (for penalties) and grammar
        state (for structured output) per row, None where a row has none -> N token ids (one host sync). `masks`:
        the grammar rows' masks, begun before the forward pass (`Grammars.begin_masks`); else computed here."""
        histories = histories if histories is not None else [None] * len(params)
        raw = logits
        logits = adjust_logits(logits, params, output_positions, histories, self.eos_token_ids)
        guided = [i for i, g in enumerate(grammars or ()) if g is not None]
        if guided:
            index = torch.tensor(guided, device=logits.device)
            masks = masks or self.grammars.begin_masks([grammars[i] for i in guided])
            allowed = masks.allowed(logits.device)  # [G, V]
            rows = logits[index]  # [G, V], a copy
            mask_rows(rows, raw[index], allowed, [j for j, i in enumerate(guided) if params[i].adjusts_logits])
            logits = logits.clone() if logits is raw else logits
            logits[index] = rows
        tokens = logits.argmax(dim=-1)  # [N]
        rows = [row for row, p in enumerate(params) if not p.greedy]
        if rows:
            index = torch.tensor(rows, device=logits.device)
            probs = torch.softmax(filter_rows(logits[index], [params[r] for r in rows]), dim=-1)  # [R, V]
            tokens[index] = self._draw(probs, [params[r] for r in rows], [output_positions[r] for r in rows])
        return tokens.tolist()

    def _draw(self, probs: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]) -> torch.Tensor:
        """probs: [R, V] -> [R] draws: rows without a seed together from the shared generator, each seeded row
        from its own (seed, position) generator."""
        drawn = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        shared = [i for i, p in enumerate(params) if p.seed is None]
        if shared:
            index = torch.tensor(shared, device=probs.device)
            drawn[index] = torch.multinomial(probs[index], 1, generator=self.generator)[:, 0]
        for i, (p, position) in enumerate(zip(params, positions)):
            if p.seed is not None:
                generator = seeded_generator(p.seed, position, self.device)
                drawn[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
        return drawn


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
