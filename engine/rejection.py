"""Speculative sampling's acceptance rule (Leviathan et al. 2023; Chen et al. 2023): which of a draft's proposals a
sampled request keeps, so that its output follows the model's own distribution exactly.

For each proposal x_i, drawn by the draft from q_i: keep it with probability min(1, p_i(x_i) / q_i(x_i)), where p_i
is the model's distribution at that position (after temperature and top-k / top-p / min-p, the distribution the
sampler would draw from). At the first proposal rejected, draw the token from the residual max(0, p_i - q_i),
normalised, and stop; when every proposal is kept, draw one more token from p_{k+1}. Each step then emits 1 to
k + 1 tokens, each distributed as if the model had sampled it alone. Greedy requests need none of this: they keep
the proposals equal to the model's argmax (`engine.prompt_lookup.verify`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def certain(proposed: Sequence[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[k, V] the distributions of proposals that were not drawn but chosen (prompt lookup's): all mass on each. A
    proposal x is then kept with probability p(x), and a rejected one is replaced by a draw from p without x."""
    probs = torch.zeros(len(proposed), vocab_size, device=device)
    probs[torch.arange(len(proposed), device=device), torch.tensor(list(proposed), device=device)] = 1.0
    return probs


def accept(proposed: Sequence[int], draft_probs: torch.Tensor, target_probs: torch.Tensor,
           generator: torch.Generator) -> tuple[int, ...]:
    """draft_probs: [k, V] the distributions the k proposals were drawn from; target_probs: [k + 1, V] the model's
    after the request's last token and after each proposal -> the tokens emitted (one host sync, two if a token is
    drawn)."""
    k = len(proposed)
    device = target_probs.device
    index = torch.arange(k, device=device)
    tokens = torch.tensor(list(proposed), dtype=torch.long, device=device)
    p = target_probs[index, tokens]  # [k]
    q = draft_probs[index, tokens]  # [k]
    uniform = torch.rand(k, generator=generator, device=device)
    kept = (uniform * q <= p).tolist()  # u <= p / q without dividing by a zero q
    rejected_at = kept.index(False) if False in kept else k
    if rejected_at == k:
        last = target_probs[k]
    else:
        residual = (target_probs[rejected_at] - draft_probs[rejected_at]).clamp_min_(0)
        last = residual if residual.sum() > 0 else target_probs[rejected_at]  # p == q: then it is never rejected
    drawn = int(torch.multinomial(last, 1, generator=generator))
    return (*proposed[:rejected_at], drawn)
