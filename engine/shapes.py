"""Named shapes of real models, for random-weight speed work ("random:llama-3-8b"), and one tiny shape for tests.

The numbers are those of each model's published config.json.
"""

from __future__ import annotations

from pdserve.engine.config import ConfigError, ModelConfig, RopeScaling

_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)

SHAPES: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama-2-7b": ModelConfig(
        architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, max_position=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama-3-8b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position=131072,
        tie_word_embeddings=False, rope_scaling=_LLAMA31_ROPE, bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
    "llama-3-70b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position=131072,
        tie_word_embeddings=False, rope_scaling=_LLAMA31_ROPE, bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
    "tiny": ModelConfig(  # not a real model: small enough that a test can enumerate its whole distribution
        architecture="llama", vocab_size=16, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
    ),
    "qwen2-0.5b": ModelConfig(
        architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position=32768,
        tie_word_embeddings=True, attention_bias=True, eos_token_ids=(151643,),
    ),
}


def shape(name: str) -> ModelConfig:
    """The named shape, or a ConfigError listing the known ones."""
    if name not in SHAPES:
        raise ConfigError(f"engine.model: unknown shape {name!r} (known: {', '.join(sorted(SHAPES))})")
    return SHAPES[name]
