"""Read a GGUF file: the model's shape from its metadata, and its tensors dequantized, under Hugging Face names.

GGUF stores Llama's q and k projections permuted for llama.cpp's interleaved RoPE; we undo that (as transformers
does) so the weights fit the rotate-half layout. Qwen2 files are not permuted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from pdserve.engine.config import ConfigError, ModelConfig

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _field(reader: GGUFReader, key: str, default: object = None) -> object:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader: GGUFReader) -> ModelConfig:
    arch = str(_field(reader, "general.architecture"))
    if arch not in ("llama", "qwen2"):
        raise ConfigError(f"engine.model: GGUF architecture {arch!r} is not supported (llama, qwen2)")

    def get(key: str, default: object = None) -> object:
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ConfigError(f"engine.model: GGUF metadata {arch}.{key} is missing")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position=int(get("context_length")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: [heads * D, in] with pairs interleaved -> halves."""
    dim = weight.shape[0] // heads // 2
    return weight.reshape(heads, dim, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_PATTERN.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ConfigError(f"engine.model: unexpected GGUF tensor {name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def read_tensors(reader: GGUFReader, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, fp32 tensor [out, in]) for every tensor in the file."""
    for tensor in reader.tensors:
        array = dequantize(tensor.data, tensor.tensor_type)
        array = array.reshape([int(d) for d in reversed(tensor.shape.tolist())])
        if cfg.architecture == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            array = _unpermute(array, cfg.num_heads if ".attn_q." in tensor.name else cfg.num_kv_heads)
        yield _hf_name(tensor.name), torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))
