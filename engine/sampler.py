"""Pick each request's next token from its logits: greedy, or temperature with top-k and top-p.

Greedy rows take the argmax together. A sampled row draws with its own generator: for a request with a seed that
generator is seeded from (seed, output position), so the draw does not depend on the batch, the worker, or how many
times the request was preempted; otherwise the engine's shared generator is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.engine.sampling_params import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant, spreads (seed, position) over 63 bits


def seeded_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    mixed = (seed * _MIX + position) & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator(device=device).manual_seed(mixed)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [V] fp32 -> temperature-scaled logits with tokens outside top-k / top-p set to -inf.

    top-p keeps the smallest set of most likely tokens whose probability mass reaches p."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= params.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


class Sampler:
    def __init__(self, seed: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               output_positions: Sequence[int]) -> list[int]:
        """logits: [N, V] fp32; one SamplingParams and output position per row -> N token ids."""
        tokens = logits.argmax(dim=-1).tolist()
        for row, (p, position) in enumerate(zip(params, output_positions)):
            if p.greedy:
                continue
            generator = self.generator if p.seed is None else seeded_generator(p.seed, position, self.device)
            probs = torch.softmax(filter_logits(logits[row], p), dim=-1)
            tokens[row] = int(torch.multinomial(probs, 1, generator=generator).item())
        return tokens
