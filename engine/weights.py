"""Build a `LlamaModel` with weights from a source: GGUF, a Hugging Face folder, or random of a named shape.

A GGUF file is read through its converted copy (engine.gguf_cache), which is a safetensors folder like any other.
Every source yields tensors under Hugging Face names with `[out, in]` linear weights; `convert` turns them into our
layout (fused q/k/v and gate/up, transposed to `[in, out]`). The model is built on the meta device and the
converted tensors are assigned, so weights are never held twice.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open

from pdserve.engine.config import ConfigError, ModelConfig
from pdserve.engine.gguf_cache import converted
from pdserve.engine.model import LlamaModel
from pdserve.engine.model_source import ModelSource, SourceKind
from pdserve.engine.rope import Rope

log = logging.getLogger(__name__)


def hf_tensors(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) pairs of a safetensors folder, or of a GGUF file's converted copy."""
    folder = converted(str(source.path)) if source.kind is SourceKind.GGUF else str(source.path)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ConfigError(f"engine.model: no *.safetensors files in {folder!r}")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def convert(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
            device: torch.device | str) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors -> our state dict."""
    hf = {name.removeprefix("model.") if name.startswith("model.") else name: t for name, t in tensors}

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ConfigError(f"engine.model: weights are missing {name!r}")
        return hf.pop(name)

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    out: dict[str, torch.Tensor] = {}
    embed = take("embed_tokens.weight")
    out["embed"] = put(embed)
    lm_head = hf.pop("lm_head.weight", None)
    if lm_head is None and not cfg.tie_word_embeddings:
        raise ConfigError("engine.model: weights are missing 'lm_head.weight' and embeddings are not tied")
    out["lm_head.weight"] = put((embed if lm_head is None else lm_head).t())
    out["norm.weight"] = put(take("norm.weight"))
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        attn = [take(f"{p}self_attn.{x}_proj.weight") for x in "qkv"]
        out[p + "attn.qkv.weight"] = put(torch.cat(attn, dim=0).t())
        if cfg.attention_bias:
            out[p + "attn.qkv.bias"] = put(torch.cat([take(f"{p}self_attn.{x}_proj.bias") for x in "qkv"]))
        out[p + "attn.o.weight"] = put(take(f"{p}self_attn.o_proj.weight").t())
        gate_up = [take(f"{p}mlp.{x}_proj.weight") for x in ("gate", "up")]
        out[p + "mlp.gate_up.weight"] = put(torch.cat(gate_up, dim=0).t())
        out[p + "mlp.down.weight"] = put(take(f"{p}mlp.down_proj.weight").t())
        out[p + "attn_norm.weight"] = put(take(f"{p}input_layernorm.weight"))
        out[p + "mlp_norm.weight"] = put(take(f"{p}post_attention_layernorm.weight"))
    leftover = [n for n in hf if "rotary_emb" not in n]
    if leftover:
        log.warning("ignored %d unexpected weight tensors, e.g. %s", len(leftover), leftover[:3])
    return out


def random_state_dict(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the right shape (normal, std 0.02; norms 1), made directly on the device."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    out = {}
    for name, param in model.state_dict().items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(param.shape, dtype=dtype, device=device)
        else:
            t = torch.empty(param.shape, dtype=dtype, device=device)
            out[name] = t.normal_(0.0, 0.02, generator=generator)
    return out


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], max_positions: int) -> LlamaModel:
    """Assign a converted state dict to a model made on the meta device."""
    with torch.device("meta"):
        model = LlamaModel(cfg)
    if not cfg.attention_bias:
        state = {k: v for k, v in state.items() if not k.endswith("qkv.bias")}
    model.load_state_dict(state, assign=True, strict=True)
    first = state["embed"]
    model.rope = Rope(cfg, max_positions, first.dtype, first.device)
    return model.eval()


def load_model(source: ModelSource, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
               max_positions: int, seed: int = 0) -> LlamaModel:
    if source.kind is SourceKind.RANDOM:
        state = random_state_dict(cfg, dtype, device, seed)
    else:
        state = convert(cfg, hf_tensors(source), dtype, device)
    return build_model(cfg, state, max_positions)
