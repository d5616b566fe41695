"""A Llama-family decoder (Llama 2/3, SmolLM2, Qwen2) in plain torch, over a flat batch of tokens.

A step's tokens from all requests are concatenated: `input_ids [T]`, `positions [T]`; attention separates them by
the metadata. Linear weights are stored `[in, out]` and q/k/v and gate/up are fused: on CPU `x @ W` with W
`[in, out]` runs several times faster than `F.linear` at small batch, and the same code runs on CUDA.
Weights are loaded by `engine.weights` from Hugging Face-named tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention import paged_attention
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import AttentionMetadata, KVCache
from pdserve.engine.rope import Rope, apply_rope


class Linear(nn.Module):
    """y = x @ weight (+ bias), weight [in, out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o = Linear(cfg.q_size, cfg.hidden_size)

    def project(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> q [T, H, D], k and v [T, KVH, D], q and k rotated."""
        cfg, tokens = self.cfg, x.shape[0]
        qkv = self.qkv(x)  # [T, (H + 2 KVH) * D]
        qk = qkv[:, :cfg.q_size + cfg.kv_size].view(tokens, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(qk, cos, sin).split([cfg.num_heads, cfg.num_kv_heads], dim=1)  # [T, H, D], [T, KVH, D]
        v = qkv[:, cfg.q_size + cfg.kv_size:].view(tokens, cfg.num_kv_heads, cfg.head_dim)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Dense work before attention (`before_attention`) and after it (`after_attention`) are methods of their own,
    so that `engine.acceleration.compile_layers` can compile them while the paged attention between stays eager."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.before_attention(h, cos, sin)
        out = paged_attention(q, k, v, kv[0], kv[1], meta)  # [T, H, D]
        return self.after_attention(h, out)

    def before_attention(self, h: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.attn.project(self.attn_norm(h), cos, sin)

    def after_attention(self, h: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
        """h: [T, hidden] the layer's input; attention_out: [T, H, D] -> the layer's output [T, hidden]."""
        h = h + self.attn.o(attention_out.flatten(1))
        return h + self.mlp(self.mlp_norm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # [hidden, vocab]; a contiguous transposed copy of `embed` when the embeddings are tied.
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.rope: Rope | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] (before the final norm). `on_layer(i)` runs after
        layer i (its KV written), for layer-wise KV streaming."""
        if self.rope is None:
            raise RuntimeError("LlamaModel.rope is not set; load the model through engine.weights")
        h = self.embed[input_ids]  # [T, hidden]
        cos, sin = self.rope.tables(positions)  # [T, 1, D]
        for index, layer in enumerate(self.layers):
            h = layer(h, cos, sin, kv_cache.layer(index), meta)
            if on_layer is not None:
                on_layer(index)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> [N, vocab] fp32 logits."""
        return self.lm_head(self.norm(hidden)).float()
