"""int8 and int4 quantisation of the model's linear layers, on torch's own integer matmul ops.

`engine.quantization: int8` stores each linear weight as int8 with one fp32 scale per output channel
(`aten._weight_int8pack_mm`); `int4` stores 4-bit values in groups of `INT4_GROUP` input channels, each group with
its own scale and zero point (`aten._weight_int4pack_mm_for_cpu` on CPU, `aten._weight_int4pack_mm` on CUDA). The
LM head gets int8 in both modes, as llama.cpp keeps its output matrix at higher precision than its Q4 layers.

Activations enter these ops in bf16 and leave in the model's dtype: on CPU the packed kernels are fast for bf16
inputs only (fp32 inputs take a path 4-50x slower on dev-cpu, BENCHMARKS.md), and on CUDA they take bf16 only.
On CPU the packed kernels are matrix-vector kernels: for a step of `DEQUANTIZE_ROWS` rows or more (a prefill) the
layer instead dequantises its weight and runs a dense GEMM, where the weight read is small next to the arithmetic.
`w8a8` keeps int8's weights and also quantises the activations: each row of a layer's input gets its own scale at
run time (absmax / 127, as llama.cpp's Q8_0 activations and torchao's dynamic int8 do), and the product is one
int8 x int8 -> int32 matmul (`aten._int_mm`, VNNI on CPU). It is the fastest setting once a step has several rows
(16-row decode steps, prefill), where the weight-only kernels, being matrix-vector kernels, are not.
Embeddings and norms stay in the model's dtype. Quantisation changes numerics: greedy output is no longer identical
to transformers; `bench/quantization_quality.py` measures the agreement and perplexity.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.config import ConfigError

INT4_GROUP = 32
"""Input channels sharing one int4 scale and zero point (llama.cpp's Q4_0/Q4_1 use 32 too)."""
DEQUANTIZE_ROWS = 64
"""On CPU, steps of at least this many rows run dense on the dequantised weight."""
CUDA_INT8_DEQUANTIZE_ROWS = 17
"""On CUDA, int8 steps of at least this many rows run dense too: torch's CUDA `_weight_int8pack_mm` computes each
output in one thread (a matrix-vector kernel, no tensor cores), which only small decode batches can afford."""
CUDA_DEQUANTIZE_CHUNK = 8192
"""On CUDA the dense path dequantises this many output channels at a time, so its temporary stays small (64 MiB
for a 4096-wide bf16 input) where the whole weight would not: Llama-3's LM head alone is 1 GiB in bf16, and inside
a CUDA graph's memory pool a temporary stays reserved for good."""
CUDA_INT_MM_MIN_ROWS = 16
"""On CUDA `aten._int_mm` needs more rows than this; smaller steps are padded with zero rows."""
INT4_INNER_K_TILES = (8, 4, 2)
"""The CUDA int4 layout's tilings of the input dimension K, best first: `inner_k_tiles` t needs K a multiple of
16 t (Llama-3-8B's 4096 and 14336 take 8; SmolLM2's 576 takes 4)."""


class Quantization(Enum):
    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"
    W8A8 = "w8a8"


def _int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: [in, out] float (our Linear's layout) -> int8 [out, in] and one fp32 scale per output channel [out]."""
    w = weight.t().float().contiguous()  # [out, in]
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x @ W.T with W int8 [out, in] and one scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """weight: [in, out] float (our Linear's layout)."""
        super().__init__()
        qweight, scale = _int8_per_channel(weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(torch.bfloat16))  # the packed kernel's dtype
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.shape[0] >= CUDA_INT8_DEQUANTIZE_ROWS:
            return self._dense_in_chunks(x)
        if not x.is_cuda and x.shape[0] >= DEQUANTIZE_ROWS:
            return F.linear(x, self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None], self.bias)
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scale).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _dense_in_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] -> [M, out] as a dense GEMM on the weight dequantised CUDA_DEQUANTIZE_CHUNK channels at a time."""
        out = torch.empty(x.shape[0], self.qweight.shape[0], dtype=x.dtype, device=x.device)  # [M, out]
        for start in range(0, self.qweight.shape[0], CUDA_DEQUANTIZE_CHUNK):
            part = slice(start, start + CUDA_DEQUANTIZE_CHUNK)
            out[:, part] = F.linear(x, self.qweight[part].to(x.dtype))
        out *= self.scale.to(x.dtype)
        return out if self.bias is None else out + self.bias


class W8A8Linear(nn.Module):
    """y = x @ W.T with W int8 [out, in] (one scale per output channel) and x quantised to int8 per row at run time."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """weight: [in, out] float (our Linear's layout)."""
        super().__init__()
        qweight, scale = _int8_per_channel(weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        x32 = x.float()
        x_scale = x32.abs().amax(dim=1, keepdim=True).clamp_(min=1e-8) / 127.0  # [M, 1]
        qx = (x32 / x_scale).round_().to(torch.int8)  # [M, in]
        if x.is_cuda and rows <= CUDA_INT_MM_MIN_ROWS:
            qx = F.pad(qx, (0, 0, 0, CUDA_INT_MM_MIN_ROWS + 1 - rows))
        acc = torch._int_mm(qx, self.qweight.t())[:rows]  # [M, out] int32
        y = (acc * x_scale * self.scale).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """y = x @ W.T with W in asymmetric 4-bit groups of INT4_GROUP input channels, packed for the device's kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """weight: [in, out] float; `in` must be a multiple of INT4_GROUP."""
        super().__init__()
        w = weight.t().float().contiguous()  # [out, in]
        out_features, in_features = w.shape
        if in_features % INT4_GROUP:
            raise ConfigError(f"engine.quantization: int4 needs input sizes divisible by {INT4_GROUP}, "
                              f"got {in_features}")
        groups = w.view(out_features, in_features // INT4_GROUP, INT4_GROUP)  # [N, K/G, G]
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, K/G]
        scale = (high - low).clamp(min=1e-8) / 15.0
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        q = q.view(out_features, in_features)  # [N, K] values 0..15
        # The kernels compute (q - 8) * scale + zero, so zero = low + 8 * scale. [K/G, N, 2]
        self.register_buffer("scales_and_zeros", torch.stack([scale, low + 8 * scale], dim=-1)
                             .transpose(0, 1).contiguous().to(torch.bfloat16))
        self.register_buffer("qweight", _pack_int4(q))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= DEQUANTIZE_ROWS and not x.is_cuda and self.qweight.shape[0] % 64 == 0:
            return F.linear(x, self.dequantize().to(x.dtype), self.bias)
        x16 = x.to(torch.bfloat16)
        if self.qweight.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x16, self.qweight, INT4_GROUP, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x16, self.qweight, INT4_GROUP, self.scales_and_zeros)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


    def dequantize(self) -> torch.Tensor:
        """The CPU-packed weight as float [out, in] (out a multiple of 64)."""
        q = _unpack_cpu_int4(self.qweight)  # [N, K] 0..15
        scale, zero = self.scales_and_zeros.float().unbind(-1)  # each [K/G, N]
        groups = q.view(q.shape[0], -1, INT4_GROUP).float() - 8  # [N, K/G, G]
        return (groups * scale.t()[..., None] + zero.t()[..., None]).flatten(1)


def _unpack_cpu_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `_convert_weight_to_int4pack_for_cpu(q, 1)` for N a multiple of 64: [N, K/2] uint8 -> q
    [N, K] uint8. Each block of 64 rows is stored k-major: for every k, 32 bytes, byte i holding row i in its low
    nibble and row i + 32 in its high nibble (read off torch 2.13; tests/unit/test_quantization.py checks it)."""
    rows, half = packed.shape
    blocks = packed.view(rows // 64, half * 2, 32)  # [N/64, K, 32]
    by_k = torch.cat([blocks & 0xF, blocks >> 4], dim=-1)  # [N/64, K, 64]
    return by_k.transpose(1, 2).reshape(rows, half * 2)  # [N, K]


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: [N, K] int32 values 0..15 -> the packed layout of the device's int4 matmul."""
    if q.is_cuda:
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # [N, K/2], even column in the high nibble
        tiles = next(t for t in INT4_INNER_K_TILES if q.shape[1] % (16 * t) == 0)  # K % INT4_GROUP == 0: t = 2 fits
        return torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)


def quantize_model(model: nn.Module, method: Quantization) -> None:
    """Replace the model's linear layers in place (decoder layers by `method`; the LM head by w8a8 under w8a8, by
    int8 otherwise)."""
    if method is Quantization.NONE:
        return
    layer_kind = {Quantization.INT8: Int8Linear, Quantization.INT4: Int4Linear, Quantization.W8A8: W8A8Linear}[method]
    for layer in model.layers:
        for parent, name in ((layer.attn, "qkv"), (layer.attn, "o"), (layer.mlp, "gate_up"), (layer.mlp, "down")):
            _replace(parent, name, layer_kind)
    _replace(model, "lm_head", W8A8Linear if method is Quantization.W8A8 else Int8Linear)


def _replace(parent: nn.Module, name: str, kind: type[nn.Module]) -> None:
    linear = getattr(parent, name)
    setattr(parent, name, kind(linear.weight.data, linear.bias))  # the float weight goes with the old module


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what a decode step reads, with the embedding table counted once)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
