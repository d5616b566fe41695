"""What the engine turns on for its device: the paged attention kernels, a KV cache sized from free GPU memory, and
compiled decoder layers.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from pdserve.engine.config import ConfigError, EngineConfig
from pdserve.engine.model import LlamaModel

log = logging.getLogger(__name__)

ACTIVATION_RESERVE_GIB = 2.0
"""GPU memory kept out of the KV cache for a step's activations, logits and CUDA graphs."""


def uses_paged_attention(config: EngineConfig) -> bool:
    """Whether the Triton kernels run attention; "auto" takes them on CUDA when Triton imports."""
    on_cuda = config.device.startswith("cuda")
    if config.attention == "torch" or config.speculative.method == "lookahead":  # its masks: torch attention only
        return False
    if config.attention == "auto":
        return on_cuda and importlib.util.find_spec("triton") is not None
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("engine.attention: 'triton' needs the triton package (pip install triton)")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("engine.attention: 'triton' on CPU runs only under TRITON_INTERPRET=1 (for tests); "
                          "use 'torch' or 'auto'")
    return True


def kv_blocks_from_free_memory(config: EngineConfig, bytes_per_block: int) -> int:
    """KV blocks that fit in this engine's share of the GPU once its weights are loaded.

    `gpu_memory_utilization` is the share of the GPU's memory this engine may hold (as in vLLM), so two workers at
    0.45 can share one GPU: what this process holds already (its weights) comes out of its own share, what other
    processes hold does not, and the cache never takes more than is free, less a reserve for activations."""
    device = torch.device(config.device)
    torch.cuda.empty_cache()  # what loading left cached (quantisation's temporaries) is free for the cache
    free, total = torch.cuda.mem_get_info(device)
    ours = torch.cuda.memory_reserved(device)
    reserve = ACTIVATION_RESERVE_GIB * 2**30
    budget = min(total * config.gpu_memory_utilization - ours, free) - reserve
    if budget < bytes_per_block:
        raise ConfigError(f"engine.gpu_memory_utilization: {config.gpu_memory_utilization} of {total / 2**30:.1f} "
                          f"GiB leaves no room for a KV cache (this engine holds {ours / 2**30:.1f} GiB, "
                          f"{free / 2**30:.1f} GiB is free, {ACTIVATION_RESERVE_GIB:g} GiB is kept for activations)")
    return int(budget // bytes_per_block)


def compile_layers(model: LlamaModel) -> None:
    """torch.compile each layer's dense parts; every layer runs the same code, so they share one compiled graph
    (per shape class: token counts are dynamic)."""
    for layer in model.layers:
        layer.before_attention = torch.compile(layer.before_attention, dynamic=True)
        layer.after_attention = torch.compile(layer.after_attention, dynamic=True)
    log.info("decoder layers set to compile: the first steps of each shape class compile them")
