"""Roofline cost model of one engine step: the FLOPs and bytes it moves, and how long it takes on given hardware.

This module owns the arithmetic of a Llama-family decoder step on one worker of `tensor_parallel` GPUs, plus the
memory sums around it (weights per GPU, KV bytes per token, KV capacity) and the time to move KV between workers.
Pure Python arithmetic on ints and floats (no torch): a discrete-event simulator calls `step_cost` millions of times,
so everything per model is worked out once in `CostModel.__init__` and a step is one pass over its chunks.

A step is a list of `ChunkShape`s (one per scheduled request: a prefill chunk or a decode token). Its time, per GPU
(every TP rank does the same share at once):

    compute_s = (linear_flops + attention_flops) / (peak_flops * COMPUTE_EFFICIENCY)
    memory_s  = (weight_bytes + kv_bytes) / (hbm_bytes_per_s * MEMORY_EFFICIENCY)
    comm_s    = 2 * layers * (ALLREDUCE_LATENCY_S + 2 (tp - 1) / tp * new_tokens * hidden * dtype_bytes / nvlink)
    seconds   = compute_s + memory_s + comm_s + STEP_OVERHEAD_S      (comm_s is 0 at tp 1; an empty step costs 0)

- linear FLOPs: 2 per weight per new token for every matmul of every layer, plus the LM head for sampled rows only
  (one per chunk that samples; a middle prefill chunk samples nothing). Norms, RoPE, activations: not counted.
- attention FLOPs: 4 * num_heads * head_dim per (query, key) pair per layer (QK^T and PV, 2 FLOPs a multiply-add).
  A chunk of n new tokens ending at context k attends n * (k - n) + n (n + 1) / 2 pairs (causal inside the chunk).
- weight bytes: every weight read once per step (the LM head included; the input embedding is only gathered, so left
  out when it is a separate matrix), sharded over TP.
- KV bytes: each chunk reads its whole context's K and V and writes its new tokens'. Activations are not counted:
  small next to the weights when decoding, and prefill is compute-bound anyway.
- TP: two all-reduces of the step's [new_tokens, hidden] activations per layer (after attention and after the MLP),
  as a ring over NVLink, not overlapped with compute. KV heads are replicated when tp exceeds them.

Roofline shape: compute + memory (no overlap), not max(compute, memory). The two agree at the ends, where one term
dwarfs the other: batch-1 decode is the weight read plus a little, a 2,048-token prefill is the math plus
a few percent. They differ near the ridge point (a few hundred tokens a step), and there the sum matches what is
measured: TensorRT-LLM's 128-token time to first token (16 ms for Llama-2-7B on an A100; the max form says 9 ms, the
sum 16 ms), and the known chunked-prefill behaviour that cost per token keeps falling up to chunks of ~512 tokens and
more, where the max form would go flat past ~150-250 tokens. The price: large static decode batches come out
~10% slow. `python -m pdserve.bench.calibrate_sim` prints the comparison with every published point used.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.config import ConfigError, ModelConfig
from pdserve.engine.hardware import Hardware


class Link(enum.Enum):
    """Which wire a KV transfer between two workers takes."""

    NVLINK = "nvlink"
    """Both workers in one node: GPU to GPU over NVLink."""
    NETWORK = "network"
    """Different nodes: RDMA over the scale-out network, one NIC per GPU."""


COMPUTE_EFFICIENCY = 0.70
"""Share of dense peak FLOP/s that large bf16 GEMMs and flash attention sustain. cuBLAS bf16 GEMMs reach ~70% of peak
on H100 SXM (~700 of 989 TFLOP/s) and 75-85% on A100; with the compute + memory roofline, 0.70 reproduces TensorRT-LLM's
A100 FP16 time to first token for 2,048-token prompts (Llama-2-7B 133 ms, Llama-2-70B at TP 4 377 ms) within 2-7%."""

MEMORY_EFFICIENCY = 0.85
"""Share of peak HBM bandwidth that streaming weights and KV sustain: copy kernels reach ~85-90% (H100 ~2.9 of
3.35 TB/s). Fitted, with STEP_OVERHEAD_S, to batch-1 decode of Llama-3.1-8B bf16 on vLLM: 6.48 ms/token on H100 SXM,
~13.3 ms/token on A100 40GB (the model gives 6.3 and 12.5)."""

STEP_OVERHEAD_S = 1.0e-3
"""Fixed cost of every step on top of the GPU work: scheduling, input preparation, sampling, launch gaps (with CUDA
graphs): what is left of current vLLM's batch-1 decode once the weights are read. Older stacks paid several ms (vLLM
0.5, before multi-step scheduling): see the H200 points of the calibration."""

ALLREDUCE_LATENCY_S = 8e-6
"""Fixed latency of one small TP all-reduce inside an NVLink node (vLLM's custom all-reduce, NCCL's LL protocol:
~5-10 us for the few-KB messages of decode)."""

LINK_LATENCY_S: dict[Link, float] = {Link.NVLINK: 10e-6, Link.NETWORK: 25e-6}
"""Fixed latency of one KV transfer: a GPU-to-GPU copy over NVLink ~10 us, an RDMA write over InfiniBand ~25 us."""


@dataclass(frozen=True, slots=True)
class ChunkShape:
    """One request's part of a step: `new_tokens` tokens run through the model."""

    new_tokens: int
    context_len: int
    """Tokens in the request's KV after this chunk (start position + new_tokens)."""
    sample: bool = True
    """Whether this chunk samples a token (runs the LM head on its last row); False for a middle prefill chunk."""

    def __post_init__(self) -> None:
        if self.new_tokens < 1 or self.context_len < self.new_tokens:
            raise ValueError(f"ChunkShape: need 1 <= new_tokens <= context_len, got {self.new_tokens}, "
                             f"{self.context_len}")


@dataclass(frozen=True, slots=True)
class StepCost:
    """What one step costs on each GPU of the worker (every TP rank does the same share)."""

    flops: float
    """FLOPs one GPU performs."""
    bytes: float
    """Bytes one GPU reads from and writes to HBM."""
    compute_s: float
    """flops at the achievable compute rate."""
    memory_s: float
    """bytes at the achievable memory bandwidth."""
    comm_s: float
    """Time in TP all-reduces (0 at tp 1)."""
    seconds: float
    """Modelled duration of the step (see the module docstring)."""

    def mfu(self, hardware: Hardware) -> float:
        """Model FLOPs utilization: achieved FLOP/s over the GPU's peak."""
        return self.flops / (self.seconds * hardware.peak_flops) if self.seconds else 0.0

    def mbu(self, hardware: Hardware) -> float:
        """Model bandwidth utilization: achieved bytes/s over the GPU's peak HBM bandwidth."""
        return self.bytes / (self.seconds * hardware.hbm_bytes_per_s) if self.seconds else 0.0


EMPTY_STEP = StepCost(flops=0.0, bytes=0.0, compute_s=0.0, memory_s=0.0, comm_s=0.0, seconds=0.0)


class CostModel:
    """Step times of `model` on one worker of `tensor_parallel` GPUs of `hardware`, weights and KV in `dtype_bytes`."""

    def __init__(self, model: ModelConfig, hardware: Hardware, tensor_parallel: int = 1, dtype_bytes: int = 2) -> None:
        tp = tensor_parallel
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"engine.sim.tensor_parallel: must be an integer >= 1, got {tp!r}")
        if model.num_heads % tp:
            raise ConfigError(f"engine.sim.tensor_parallel: {tp} does not divide the model's {model.num_heads} heads")
        if model.num_kv_heads % tp and tp % model.num_kv_heads:
            raise ConfigError(f"engine.sim.tensor_parallel: {tp} neither divides nor is a multiple of the model's "
                              f"{model.num_kv_heads} KV heads")
        if dtype_bytes not in (1, 2, 4):
            raise ValueError(f"dtype_bytes must be 1, 2 or 4, got {dtype_bytes}")
        self.model = model
        self.hardware = hardware
        self.tensor_parallel = tp
        self.dtype_bytes = dtype_bytes

        h, layers, head_dim = model.hidden_size, model.num_layers, model.head_dim
        q_rank = model.q_size // tp
        kv_rank = max(1, model.num_kv_heads // tp) * head_dim  # KV heads are replicated when tp > num_kv_heads
        matmul_rank = h * (q_rank + 2 * kv_rank) + q_rank * h + 3 * h * model.intermediate_size // tp
        bias_rank = (q_rank + 2 * kv_rank) if model.attention_bias else 0
        embed_rank = model.vocab_size * h // tp
        self._params_rank = (layers * (matmul_rank + bias_rank + 2 * h) + h
                             + embed_rank * (1 if model.tie_word_embeddings else 2))
        read_params = self._params_rank - (0 if model.tie_word_embeddings else embed_rank)

        # Everything below is per GPU.
        self._linear_flops_per_token = 2.0 * layers * matmul_rank
        self._lm_head_flops_per_row = 2.0 * embed_rank
        self._attention_flops_per_pair = 4.0 * layers * q_rank
        self._weight_read_bytes = float(read_params * dtype_bytes)
        self._kv_bytes_per_token_rank = 2 * layers * kv_rank * dtype_bytes
        self._allreduce_bytes_per_token = 2.0 * (tp - 1) / tp * h * dtype_bytes
        self._allreduces = 2 * layers if tp > 1 else 0

        compute_rate = hardware.peak_flops * COMPUTE_EFFICIENCY
        memory_rate = hardware.hbm_bytes_per_s * MEMORY_EFFICIENCY
        self._s_per_flop = 1.0 / compute_rate
        self._weight_s = self._weight_read_bytes / memory_rate
        self._kv_s_per_token = self._kv_bytes_per_token_rank / memory_rate
        self._comm_fixed_s = self._allreduces * ALLREDUCE_LATENCY_S
        self._comm_s_per_token = self._allreduces * self._allreduce_bytes_per_token / hardware.nvlink_bytes_per_s

    # ---- memory -------------------------------------------------------------------------------------------------

    def weight_bytes(self) -> int:
        """Bytes of weights each GPU holds (its TP shard plus the replicated norms)."""
        return self._params_rank * self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        """KV bytes one token takes in the whole worker: all layers, K and V, all TP ranks together."""
        return self._kv_bytes_per_token_rank * self.tensor_parallel

    def kv_capacity_tokens(self, memory_fraction: float = 0.9) -> int:
        """Tokens of KV the worker holds when weights + KV may use `memory_fraction` of every GPU's memory."""
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        budget = self.hardware.memory_bytes * memory_fraction
        free = budget - self.weight_bytes()
        if free <= 0:
            raise ConfigError(
                f"engine.sim.tensor_parallel: {self.tensor_parallel} GPU(s) of {self.hardware.name} leave no room for "
                f"KV: weights take {self.weight_bytes() / 2**30:.1f} GiB per GPU of {budget / 2**30:.1f} GiB usable "
                f"({memory_fraction:.0%} of {self.hardware.memory_bytes / 2**30:.0f} GiB); use more GPUs")
        return int(free // self._kv_bytes_per_token_rank)

    def transfer_seconds(self, nbytes: int, link: Link) -> float:
        """Time to move `nbytes` of KV between two workers of this shape: each TP rank sends its shard at once."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if nbytes == 0:
            return 0.0
        bandwidth = self.hardware.nvlink_bytes_per_s if link is Link.NVLINK else self.hardware.network_bytes_per_s
        return nbytes / (bandwidth * self.tensor_parallel) + LINK_LATENCY_S[link]

    def streamed_transfer_seconds(self, nbytes: int, link: Link, last_step_s: float) -> float:
        """Time from the end of a prefill's last step until its KV has arrived, when each layer is sent as soon as
        that step has computed it (layer-wise streaming) instead of after the step. The wire starts one layer into
        the step and finishes at the latest one layer's share of the transfer after the step: what is left exposed
        is max(T / L, T - C (L - 1) / L) for a transfer of T seconds and a last step of C."""
        total = self.transfer_seconds(nbytes, link)
        layers = self.model.num_layers
        return max(total / layers, total - last_step_s * (layers - 1) / layers)

    # ---- steps --------------------------------------------------------------------------------------------------

    def step_cost(self, chunks: Sequence[ChunkShape]) -> StepCost:
        """FLOPs, bytes and modelled seconds of one step running `chunks` together."""
        if not chunks:
            return EMPTY_STEP
        new, context, pairs, sampled = _sums(chunks)
        return StepCost(*self._cost(new, context, pairs, sampled))

    def step_seconds(self, chunks: Sequence[ChunkShape]) -> float:
        """Modelled seconds of one step running `chunks` together (0 for an empty step)."""
        if not chunks:
            return 0.0
        new, context, pairs, sampled = _sums(chunks)
        return self._cost(new, context, pairs, sampled)[5]

    def sums_cost(self, new: int, context: int, pairs: int, sampled: int) -> StepCost:
        """`step_cost` from a step's sums (see `_sums`), for callers that add them up without building chunks."""
        return StepCost(*self._cost(new, context, pairs, sampled)) if new else EMPTY_STEP

    def prefill_seconds(self, prompt_tokens: int, chunk: int | None = None) -> float:
        """Time to prefill one prompt alone, in steps of at most `chunk` tokens (one step when None)."""
        if prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be >= 0, got {prompt_tokens}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        step = prompt_tokens if chunk is None else chunk
        total, done = 0.0, 0
        while done < prompt_tokens:
            n = min(step, prompt_tokens - done)
            done += n
            pairs = n * (done - n) + n * (n + 1) // 2
            total += self._cost(n, done, pairs, 1 if done == prompt_tokens else 0)[5]
        return total

    def decode_step_seconds(self, batch: int, context_len: int) -> float:
        """One decode step of `batch` requests, each with `context_len` tokens of KV after the step."""
        if batch < 0 or context_len < 1:
            raise ValueError(f"need batch >= 0 and context_len >= 1, got {batch}, {context_len}")
        if batch == 0:
            return 0.0
        return self._cost(batch, batch * context_len, batch * context_len, batch)[5]

    def _cost(self, new: int, context: int, pairs: int, sampled: int) -> tuple[float, float, float, float, float,
                                                                               float]:
        """(flops, bytes, compute_s, memory_s, comm_s, seconds) per GPU for a non-empty step's sums."""
        flops = new * self._linear_flops_per_token + sampled * self._lm_head_flops_per_row \
            + pairs * self._attention_flops_per_pair
        kv_tokens = context + new  # read the whole context, write the new tokens
        compute_s = flops * self._s_per_flop
        memory_s = self._weight_s + kv_tokens * self._kv_s_per_token
        comm_s = self._comm_fixed_s + new * self._comm_s_per_token
        return (flops, self._weight_read_bytes + kv_tokens * self._kv_bytes_per_token_rank, compute_s, memory_s,
                comm_s, compute_s + memory_s + comm_s + STEP_OVERHEAD_S)


def _sums(chunks: Sequence[ChunkShape]) -> tuple[int, int, int, int]:
    """(new tokens, context tokens, attended (query, key) pairs, sampling chunks) over a step's chunks.

    A chunk of n tokens ending at context k attends n * k - n (n - 1) / 2 pairs (k for a decode token). Long lists go
    through C-level `map`/`sum` (about twice as fast per chunk as a Python loop); short ones through the loop, which
    starts faster.
    """
    if len(chunks) < _MAP_FROM:
        new = context = pairs = sampled = 0
        for c in chunks:
            n, k = c.new_tokens, c.context_len
            new += n
            context += k
            pairs += n * k - (n * (n - 1) >> 1)
            sampled += c.sample
        return new, context, pairs, sampled
    ns = list(map(_NEW_TOKENS, chunks))
    ks = list(map(_CONTEXT_LEN, chunks))
    new, context = sum(ns), sum(ks)
    if new == len(ns):  # decode tokens only
        pairs = context
    else:
        pairs = sum(map(operator.mul, ns, ks)) - (sum([n * (n - 1) for n in ns if n > 1]) >> 1)
    return new, context, pairs, sum(map(_SAMPLE, chunks))


_MAP_FROM = 8
_NEW_TOKENS = operator.attrgetter("new_tokens")
_CONTEXT_LEN = operator.attrgetter("context_len")
_SAMPLE = operator.attrgetter("sample")
