"""What an engine is built from: `build_parts(config, ...)` -> `EngineParts`.

The torch backend loads the weights, quantises them, builds the draft model (speculative `draft`), sizes and
allocates the KV cache, and gives the model runner the accelerations the config turns on: CUDA graphs on the paged
path, or on the CPU path a compiled decode step (compiled here, before the engine reports ready). The sim backend
has no weights and no tokenizer: a roofline cost model, and a KV tensor of one float per token slot, so that KV
connectors still move blocks (and keep their protocol) while the cost model says how long the real bytes would take.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from pdserve.engine.acceleration import compile_layers, kv_blocks_from_free_memory, uses_paged_attention
from pdserve.engine.compiled_decode import CompiledDecode
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.cost_model import CostModel
from pdserve.engine.cuda_graphs import DecodeGraphs
from pdserve.engine.draft import Drafter, build_draft
from pdserve.engine.fingerprint import model_fingerprint
from pdserve.engine.hardware import hardware
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.model import LlamaModel
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.model_source import ModelSource
from pdserve.engine.quantization import Quantization, quantize_model
from pdserve.engine.sampler import Sampler
from pdserve.engine.sim_runner import SimRunner
from pdserve.engine.tokenizer import Tokenizer, load_tokenizer
from pdserve.engine.weights import load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineParts:
    model: LlamaModel | None
    """None for the sim backend."""
    tokenizer: Tokenizer | None
    fingerprint: str
    """Names the model's shape and weights: a KV handoff is refused between engines whose fingerprints differ."""
    kv_cache: KVCache
    runner: ModelRunner | SimRunner
    cost_model: CostModel | None
    """The sim backend's roofline; None for the torch backend."""


def build_parts(config: EngineConfig, source: ModelSource, model_config: ModelConfig, max_model_len: int,
                realtime: bool) -> EngineParts:
    """`realtime` matters only to a sim engine: False returns from each step at once (the offline planner)."""
    if config.simulated:
        return _sim_parts(config, model_config, realtime)
    return _torch_parts(config, source, model_config, max_model_len)


def _torch_parts(config: EngineConfig, source: ModelSource, model_config: ModelConfig,
                 max_model_len: int) -> EngineParts:
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    paged = uses_paged_attention(config)
    model = load_model(source, model_config, config.torch_dtype, config.device, max_model_len, config.seed)
    fingerprint = model_fingerprint(model_config, model.embed)
    quantize_model(model, Quantization(config.quantization))
    draft = build_draft(model, config.speculative, config.quantization) \
        if config.speculative.method == "draft" else None
    if config.compile and paged:
        compile_layers(model)
    kv_cache = KVCache(model_config, num_kv_blocks(config, model_config), config.block_size, config.torch_dtype,
                       config.device)
    runner = ModelRunner(model, kv_cache, Sampler(config.seed, config.device), paged=paged)
    if draft is not None:
        runner.drafter = Drafter(draft, kv_cache, runner.prepare, runner.sampler.generator)
    if paged and config.cuda_graphs and kv_cache.tensor.is_cuda:
        runner.graphs = DecodeGraphs(model, kv_cache, config.max_num_seqs, max_model_len)
        log.info("captured %d CUDA graphs for decode steps in %.1f s", len(runner.graphs.buckets),
                 runner.graphs.capture_all())
    elif config.compile and not paged:
        runner.graphs = CompiledDecode(model, kv_cache)
        log.info("compiling the decode graphs (batch 1 and larger) before the first request")
        log.info("decode graphs compiled in %.1f s", runner.graphs.warm_up())
    return EngineParts(model, load_tokenizer(source), fingerprint, kv_cache, runner, None)


def _sim_parts(config: EngineConfig, model_config: ModelConfig, realtime: bool) -> EngineParts:
    sim = config.sim
    cost_model = CostModel(model_config, hardware(sim.hardware), sim.tensor_parallel)
    num_blocks = config.num_kv_blocks or max(
        1, cost_model.kv_capacity_tokens(sim.gpu_memory_fraction) // config.block_size)
    placeholder = dataclasses.replace(model_config, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=1)
    kv_cache = KVCache(placeholder, num_blocks, config.block_size, torch.float32, "cpu")
    return EngineParts(None, None, model_fingerprint(model_config, None), kv_cache,
                       SimRunner(cost_model, realtime, sim.time_scale), cost_model)


def num_kv_blocks(config: EngineConfig, model_config: ModelConfig) -> int:
    """`engine.num_kv_blocks`, or as many as fit: in the GPU's free memory (`gpu_memory_utilization`) on CUDA,
    in `kv_cache_gib` elsewhere."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = KVCache.bytes_per_block(model_config, config.block_size, config.torch_dtype)
    if config.device.startswith("cuda"):
        return kv_blocks_from_free_memory(config, per_block)
    return max(1, int(config.kv_cache_gib * 2**30 // per_block))
