"""Engine configuration: the model's shape and the engine's knobs, as validated frozen dataclasses.

`ModelConfig` describes a Llama-family decoder (Llama 2/3, SmolLM2, Qwen2). It is read from a Hugging Face
`config.json`, from GGUF metadata (`engine.gguf_weights`), or from a named real shape (`engine.shapes`).

`EngineConfig` is what a user sets. `EngineConfig.from_dict` takes the `engine:` section of a YAML file; every
problem raises `ConfigError` naming the field and what was wrong.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BACKENDS = ("torch", "sim")
QUANTIZATIONS = ("none", "int8", "int4", "w8a8")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""engine.dtype's names, and torch's for them. This module does not import torch: reading a config (every CLI
command does) must not cost torch's second of import."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (rope_type "llama3")."""

    factor: float
    """How much the low frequencies are stretched (8 for Llama 3.1)."""
    low_freq_factor: float
    """Wavelengths longer than original_max_position / low_freq_factor are divided by `factor`."""
    high_freq_factor: float
    """Wavelengths shorter than original_max_position / high_freq_factor are kept as they are."""
    original_max_position: int
    """The context length the model was pretrained with."""


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder."""

    architecture: str
    """"llama" or "qwen2" (q/k/v projections carry a bias)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    """The longest context the model supports."""
    tie_word_embeddings: bool
    attention_bias: bool = False
    """Whether q, k and v projections have a bias (Qwen2)."""
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, layers = self.hidden_size, self.num_layers
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * h * self.intermediate_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers * (attn + mlp + 2 * h) + embed + h

    @staticmethod
    def from_hf_config(cfg: Mapping[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json (Llama or Qwen2, transformers 4 or 5 style)."""
        arch = str(cfg.get("model_type", "llama"))
        if arch not in ("llama", "qwen2"):
            raise ConfigError(f"config.json model_type: {arch!r} is not supported (llama, qwen2)")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        heads = int(cfg["num_attention_heads"])
        return ModelConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            rope_scaling=_rope_scaling_from_hf(rope),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _rope_scaling_from_hf(rope: Mapping[str, Any]) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"config.json rope_scaling.rope_type: {kind!r} is not supported (default, llama3)")
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position=int(rope["original_max_position_embeddings"]),
    )


@dataclass(frozen=True)
class SimSettings:
    """A simulated engine (`engine.backend: sim`): the accelerator it models and how its time relates to ours."""

    hardware: str = "h100"
    """The accelerator modelled (engine.hardware: h100, h200, a100)."""
    tensor_parallel: int = 1
    """GPUs one worker spans (tensor parallelism); its KV capacity and step costs follow."""
    gpu_memory_fraction: float = 0.9
    """Share of the accelerators' memory used for weights + KV cache."""
    time_scale: float = 1.0
    """A live sim engine takes this many real seconds per modelled second (steps and KV handoffs). Above 1 a large
    simulated cluster fits a small machine's router; scale the SLOs by the same factor."""
    kv_link: str = "network"
    """The link the modelled KV crosses between workers, nvlink (one node) or network (across nodes): each handoff
    takes the modelled bytes over that link's bandwidth."""

    def __post_init__(self) -> None:
        if self.tensor_parallel <= 0:
            raise ConfigError(f"engine.sim.tensor_parallel: must be > 0, got {self.tensor_parallel}")
        if not (self.time_scale > 0 and math.isfinite(self.time_scale)):
            raise ConfigError(f"engine.sim.time_scale: must be a positive number, got {self.time_scale}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ConfigError(f"engine.sim.gpu_memory_fraction: must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.kv_link not in ("nvlink", "network"):
            raise ConfigError(f"engine.sim.kv_link: {self.kv_link!r} is not one of ['nvlink', 'network']")

    @staticmethod
    def from_dict(values: Mapping[str, Any]) -> "SimSettings":
        if not isinstance(values, Mapping):
            raise ConfigError(f"engine.sim: must be a mapping, got {type(values).__name__}")
        _check_fields("engine.sim", SimSettings, values)
        return SimSettings(**values)


SPECULATIVE_METHODS = ("none", "prompt_lookup", "draft", "lookahead")


@dataclass(frozen=True)
class SpeculativeSettings:
    """Speculative decoding (`engine.speculative`): a decode step checks proposed tokens in one forward pass and
    keeps those the model accepts, so greedy output is the same as without it and sampled output follows the same
    distribution (engine.prompt_lookup, engine.draft, engine.rejection). Requests with logit changes, logprobs or
    structured output decode one token a step, as do sampled requests with a seed (their stream of draws must not
    depend on the worker)."""

    method: str = "none"
    """"none"; "prompt_lookup": propose the tokens that followed the latest earlier occurrence of the last few
    tokens, in the prompt or the output (no draft model; pays on text that copies its input); "draft": a smaller copy
    of the model itself proposes (`draft_quantization`, `draft_layers`), reading the model's own KV cache;
    "lookahead": Jacobi iteration over a window of guesses, verifying n-grams it collects (`lookahead_window`,
    `lookahead_ngram`; greedy requests, torch attention)."""
    k: int = 4
    """Tokens proposed per request and step."""
    max_batch: int = 4
    """Speculate only while at most this many requests decode in a step: with more, checking k tokens for each costs
    more than it saves."""
    adaptive: bool = True
    """draft and lookahead: measure, per batch size, the time per token of decode steps with and without speculation
    (one step in 16 probes the other way), and speculate only where it pays (`engine.speculation_governor`); false:
    always. (Prompt lookup checks rows only where its n-gram matched, and pauses after misses: it is not measured.)"""
    draft_quantization: str = "int4"
    """method draft: the draft's linear layers quantised so (one of engine.quantization's values); it must differ
    from the model's own `engine.quantization` unless `draft_layers` cuts layers."""
    draft_layers: int | None = None
    """method draft: the draft runs only the model's first this many layers (then its final norm and LM head);
    None: all of them."""
    lookahead_window: int = 4
    """method lookahead: positions guessed ahead (W), and n-grams verified per step at most (G = W)."""
    lookahead_ngram: int = 3
    """method lookahead: the n-grams' length (N): a step emits up to N tokens and keeps N - 1 Jacobi iterations."""

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"engine.speculative.method: {self.method!r} is not one of {list(SPECULATIVE_METHODS)}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= 16:
            raise ConfigError(f"engine.speculative.k: must be an integer in [1, 16], got {self.k!r}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ConfigError(f"engine.speculative.max_batch: must be an integer > 0, got {self.max_batch!r}")
        if not isinstance(self.adaptive, bool):
            raise ConfigError(f"engine.speculative.adaptive: must be true or false, got {self.adaptive!r}")
        if self.draft_quantization not in QUANTIZATIONS:
            raise ConfigError(f"engine.speculative.draft_quantization: {self.draft_quantization!r} is not one of "
                              f"{list(QUANTIZATIONS)}")
        for name, low in (("lookahead_window", 1), ("lookahead_ngram", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 16:
                raise ConfigError(f"engine.speculative.{name}: must be an integer in [{low}, 16], got {value!r}")
        if self.draft_layers is not None and (isinstance(self.draft_layers, bool)
                                              or not isinstance(self.draft_layers, int) or self.draft_layers < 1):
            raise ConfigError(f"engine.speculative.draft_layers: must be an integer > 0 or null, "
                              f"got {self.draft_layers!r}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def measured(self) -> bool:
        """Whether the speculation governor decides where it pays (`adaptive`, for the methods that cost every
        step)."""
        return self.adaptive and self.method in ("draft", "lookahead")

    @staticmethod
    def from_dict(values: Mapping[str, Any]) -> "SpeculativeSettings":
        if not isinstance(values, Mapping):
            raise ConfigError(f"engine.speculative: must be a mapping, got {type(values).__name__}")
        _check_fields("engine.speculative", SpeculativeSettings, values)
        return SpeculativeSettings(**values)


@dataclass(frozen=True)
class EngineConfig:
    """What a user sets for one engine (one worker's model, KV cache and scheduler)."""

    model: str = "smollm2-135m-instruct"
    """A GGUF file, a Hugging Face folder (config.json + safetensors), the default model's name
    "smollm2-135m-instruct", or "random:SHAPE" for random weights of a real shape (see engine.shapes)."""
    dtype: str = "fp32"
    """Weights and KV cache dtype: fp32, bf16 or fp16."""
    device: str = "cpu"
    """"cpu", "cuda" or "cuda:N"."""
    block_size: int = 16
    """Tokens per KV block."""
    num_kv_blocks: int | None = None
    """KV blocks in the cache; when unset, as many as fit in kv_cache_gib."""
    kv_cache_gib: float = 1.0
    """Memory for the KV cache when num_kv_blocks is unset."""
    max_num_batched_tokens: int = 512
    """Token budget of one step; longer prompts are prefilled in chunks of at most this many tokens."""
    max_num_seqs: int = 64
    """Most requests running at once."""
    max_model_len: int | None = None
    """Longest prompt + output; defaults to the model's own maximum (capped at 32768)."""
    seed: int = 0
    """Seed of the sampler's shared generator (requests without their own seed)."""
    num_threads: int | None = None
    """torch CPU threads for this engine; unset leaves torch's default."""
    backend: str = "torch"
    """"torch" runs the model; "sim" runs the real scheduler and block manager with each step's duration taken from
    a roofline cost model (output tokens are placeholders; see engine.sim_runner), as `sim` describes."""
    sim: SimSettings = dataclasses.field(default_factory=SimSettings)
    """What only a simulated engine reads (the hardware it models, ...); ignored by the torch backend."""
    quantization: str = "none"
    """Quantisation of the linear layers: none; int8 (per channel) or int4 (groups of 32), weight-only; or w8a8
    (int8 weights and int8 activations scaled per row at run time, the fastest on CPU for batches and prefill); see
    engine.quantization. Changes numerics: greedy output is then close to, not identical with, transformers'."""
    attention: str = "auto"
    """Attention kernels: "torch" (gathers each request's blocks, then SDPA: the CPU path), "triton" (paged kernels
    that read the block table directly; CUDA, or CPU under TRITON_INTERPRET=1 for tests), "auto" (triton on CUDA
    when it imports, else torch)."""
    cuda_graphs: bool = True
    """Replay captured CUDA graphs for decode-only steps (batch-size buckets); CUDA with triton attention only."""
    compile: bool = False
    """torch.compile the model. With torch attention (the CPU path): each decode-only step's whole forward as one
    graph (engine.compiled_decode; prefill stays eager); with the paged kernels: each decoder layer's dense parts
    (norms, projections, MLP). Costs compiling: on the CPU path the engine compiles its decode graphs before it
    reports ready (tens of seconds on two CPU cores, a few from inductor's disk cache; BENCHMARKS.md); the paged
    path compiles on first use."""
    prefix_caching: bool = True
    """Keep the KV blocks of finished requests, named by a hash of their whole prefix, and let later requests with
    the same prefix take them instead of computing (or receiving) them again; least recently used are evicted first
    (see engine.block_manager). Greedy output is the same either way."""
    speculative: SpeculativeSettings = dataclasses.field(default_factory=SpeculativeSettings)
    """Speculative decoding (off by default)."""
    gpu_memory_utilization: float = 0.9
    """On CUDA with num_kv_blocks unset, the share of the GPU's memory this engine's weights, KV cache and a 2 GiB
    activation reserve may fill; the KV cache takes what the rest leave (kv_cache_gib is then ignored). Engines that
    share a GPU (`gpus: 0.5` each) need shares that sum to at most ~0.9: each process's CUDA context and NCCL
    buffers (~1 GiB) come on top of its share."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"engine.dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"engine.device: {self.device!r} is not 'cpu', 'cuda' or 'cuda:N'")
        _positive("block_size", self.block_size)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_num_seqs", self.max_num_seqs)
        if self.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.num_kv_blocks)
        if not (self.kv_cache_gib > 0 and math.isfinite(self.kv_cache_gib)):
            raise ConfigError(f"engine.kv_cache_gib: must be a positive number, got {self.kv_cache_gib}")
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.num_threads is not None:
            _positive("num_threads", self.num_threads)
        if self.backend not in BACKENDS:
            raise ConfigError(f"engine.backend: {self.backend!r} is not one of {list(BACKENDS)}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"engine.quantization: {self.quantization!r} is not one of {list(QUANTIZATIONS)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"engine.attention: {self.attention!r} is not one of {list(ATTENTION_BACKENDS)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"engine.gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        spec = self.speculative
        if spec.method == "lookahead" and self.attention == "triton":
            raise ConfigError("engine.speculative.method: lookahead needs per-token attention masks, which the "
                              "triton kernels do not take; use engine.attention torch or auto")
        if spec.method == "draft" and self.quantization != "none" and spec.draft_quantization not in (
                "none", self.quantization):
            raise ConfigError(f"engine.speculative.draft_quantization: the model is {self.quantization} already; "
                              f"its draft can only be cut to draft_layers (draft_quantization none)")
        if spec.method == "draft" and spec.draft_layers is None and spec.draft_quantization in ("none",
                                                                                                self.quantization):
            raise ConfigError(f"engine.speculative.draft_quantization: {spec.draft_quantization!r} is the model's "
                              f"own quantization, and no draft_layers: the draft would be the model itself")

    @property
    def simulated(self) -> bool:
        return self.backend == "sim"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch  # here, not at the top: see DTYPES

        return getattr(torch, DTYPES[self.dtype])

    @staticmethod
    def from_dict(values: Mapping[str, Any]) -> "EngineConfig":
        """Validate a mapping (a YAML `engine:` section); unknown keys and wrong types name the field."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"engine: must be a mapping, got {type(values).__name__}")
        values = dict(values)
        if "sim" in values:
            values["sim"] = SimSettings.from_dict(values["sim"])
        if "speculative" in values:
            values["speculative"] = SpeculativeSettings.from_dict(values["speculative"])
        _check_fields("engine", EngineConfig, values, skip=("sim", "speculative"))
        return EngineConfig(**values)


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"engine.{name}: must be > 0, got {value}")


_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _check_fields(path: str, cls: type, values: Mapping[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Unknown keys and wrong types name the field (`path.key`)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{path}.{key}: unknown field (known: {', '.join(sorted(fields))})")
        if key not in skip:
            _check_type(f"{path}.{key}", value, fields[key].type)


def _check_type(name: str, value: Any, annotation: str) -> None:
    optional = annotation.endswith("| None")
    base = annotation.split("|")[0].strip()
    if value is None and optional:
        return
    allowed = _TYPES[base]
    if (isinstance(value, bool) and base != "bool") or not isinstance(value, allowed):
        raise ConfigError(f"{name}: expected {base}, got {type(value).__name__} {value!r}")
