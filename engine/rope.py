"""Rotary position embeddings (Llama's rotate-half layout), with optional Llama-3 frequency scaling.

cos and sin are tabulated once for every position up to the engine's max length and gathered by position.
"""

from __future__ import annotations

import math

import torch

from pdserve.engine.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[head_dim / 2] fp32, as transformers computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rope:
    def __init__(self, model: ModelConfig, max_positions: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        inv_freq = inverse_frequencies(model.head_dim, model.rope_theta, model.rope_scaling)
        freqs = torch.arange(max_positions).float()[:, None] * inv_freq[None, :]  # [P, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = angles.cos().to(dtype=dtype, device=device)
        # rotate_half(x) * sin == swap_halves(x) * signed_sin, with the first half of sin negated
        sin = angles.sin()
        half = sin.shape[-1] // 2
        self.signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(dtype=dtype, device=device)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for the given positions, each [T, 1, D] (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, signed_sin: [T, 1, D]. Equals x * cos + rotate_half(x) * sin, in three ops."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # [x2, x1]
    return torch.addcmul(x * cos, swapped, signed_sin)
