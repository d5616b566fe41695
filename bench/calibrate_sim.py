"""Calibration: the roofline cost model (engine.cost_model) against published measurements.

    python -m pdserve.bench.calibrate_sim [--markdown]

Prints, for each reference point, the cost model's figure, the published figure and the speed ratio: modelled speed
over measured speed (published time / modelled time, or modelled throughput / published throughput), so above 1 the
model is optimistic. No GPU is needed: every figure on the model side comes from the cost model. Each reference point
carries its source and the exact conditions it was measured under; how the model reproduces a point (`how`):

- decode ms/token: one decode step of the given batch at the given context (`decode_step_seconds`);
- time to first token: one prefill of the prompt alone, in one step (`prefill_seconds`);
- static batch latency/throughput: one prefill step of the whole batch, then output_len - 1 decode steps with the
  context growing by one each step (how vLLM's `benchmark_latency` and TensorRT-LLM's `gptSessionBenchmark` run).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from pdserve.engine import cost_model
from pdserve.engine.config import ModelConfig
from pdserve.engine.cost_model import ChunkShape, CostModel
from pdserve.engine.hardware import hardware
from pdserve.engine.shapes import shape

# Llama-2-70B: the Llama-3-70B body (80 layers, hidden 8192, GQA with 8 KV heads, MLP 28672) with a 32000 vocabulary.
LLAMA_2_70B = dataclasses.replace(shape("llama-3-70b"), vocab_size=32000, rope_scaling=None, rope_theta=10000.0,
                                  max_position=4096)

TRTLLM_PERF = ("TensorRT-LLM docs, 'Performance of TensorRT-LLM' (v0.6.1 page; low-latency tables from v0.5), "
               "https://github.com/NVIDIA/TensorRT-LLM/blob/138f96d45f90b9667426f7c47297d8c06bafac73/docs/source/"
               "performance.md")
A100 = "A100 (80GB SXM assumed: the page says only A100)"
VLLM_CI = ("vLLM performance benchmark CI, build 9515, 'Latency tests' table, "
           "https://buildkite.com/vllm/performance-benchmark/builds/9515")
INFERENCEBENCH = ("InferenceBench 'Recipe: concurrency sweep' (captured 2026-05-16), "
                  "https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/")
MUSGRAVE = ("J. Musgrave, 'vLLM throughput-latency sweep on NVIDIA A100', "
            "https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on")


@dataclass(frozen=True)
class Reference:
    """One published measurement and how the cost model reproduces it."""

    label: str
    model: ModelConfig
    model_name: str
    hardware: str
    tensor_parallel: int
    how: str
    """"decode" (ms/token), "ttft" (ms), "latency" (static batch, ms end to end) or "throughput" (output tok/s)."""
    batch: int
    input_len: int
    output_len: int
    published: float
    conditions: str
    source: str

    @property
    def unit(self) -> str:
        return "tok/s" if self.how == "throughput" else "ms"


REFERENCES: tuple[Reference, ...] = (
    Reference("decode b1, 8B, H100", shape("llama-3-8b"), "Llama-3.1-8B-Instruct", "h100", 1, "decode", 1, 256, 0,
              6.48, "vLLM 0.21.0, fp16, 1x H100-80GB-HBM3, concurrency 1, workload llm.inference.chatbot-short "
              "(short prompts; modelled at 256 tokens of context), TPOT p50", INFERENCEBENCH),
    Reference("decode b1, 8B, A100-40GB", shape("llama-3-8b"), "Llama-3.1-8B-Instruct", "a100-40gb", 1, "decode", 1,
              1088, 0, 1000 / 75, "vLLM 0.23.0, BF16, 1x A100 40GB, 1024-token input, 128-token output, "
              "concurrency 1: 'about 75 tokens/sec' (modelled at the mean context, 1088)", MUSGRAVE),
    Reference("latency b8 32/128, 8B, H200", shape("llama-3-8b"), "Llama-3.1-8B", "h200", 1, "latency", 8, 32, 128,
              833.42, "vLLM benchmark_latency (default bf16), 1x H200, TP 1, batch 8, input 32, output 128, mean "
              "end-to-end latency", VLLM_CI),
    Reference("latency b8 32/128, 70B TP4, H200", shape("llama-3-70b"), "Llama-3-70B", "h200", 4, "latency", 8, 32, 128,
              2077.53, "vLLM benchmark_latency (default bf16), 4x H200, TP 4, batch 8, input 32, output 128, mean "
              "end-to-end latency", VLLM_CI),
    Reference("TTFT 128, 7B, A100", shape("llama-2-7b"), "Llama-2-7B", "a100", 1, "ttft", 1, 128, 1, 16.0,
              f"TensorRT-LLM v0.5, FP16, 1x {A100}, batch 1, input 128: '1st Token Latency'", TRTLLM_PERF),
    Reference("TTFT 2048, 7B, A100", shape("llama-2-7b"), "Llama-2-7B", "a100", 1, "ttft", 1, 2048, 1, 133.0,
              f"TensorRT-LLM v0.5, FP16, 1x {A100}, batch 1, input 2048: '1st Token Latency'", TRTLLM_PERF),
    Reference("TTFT 128, 70B TP4, A100", LLAMA_2_70B, "Llama-2-70B", "a100", 4, "ttft", 1, 128, 1, 47.0,
              f"TensorRT-LLM v0.5, FP16, 4x {A100}, TP 4, batch 1, input 128: '1st Token Latency'", TRTLLM_PERF),
    Reference("TTFT 2048, 70B TP4, A100", LLAMA_2_70B, "Llama-2-70B", "a100", 4, "ttft", 1, 2048, 1, 377.0,
              f"TensorRT-LLM v0.5, FP16, 4x {A100}, TP 4, batch 1, input 2048: '1st Token Latency'", TRTLLM_PERF),
    Reference("throughput b384 128/128, 7B, A100", shape("llama-2-7b"), "Llama-2-7B", "a100", 1, "throughput", 384,
              128, 128, 5586.0, f"TensorRT-LLM v0.6.1 gptSessionBenchmark, FP16, 1x {A100}, static batch 384, "
              "input 128, output 128: output tok/s", TRTLLM_PERF),
    Reference("throughput b60 128/2048, 7B, A100", shape("llama-2-7b"), "Llama-2-7B", "a100", 1, "throughput", 60,
              128, 2048, 1928.0, f"TensorRT-LLM v0.6.1 gptSessionBenchmark, FP16, 1x {A100}, static batch 60, "
              "input 128, output 2048: output tok/s", TRTLLM_PERF),
    Reference("throughput b52 2048/128, 7B, A100", shape("llama-2-7b"), "Llama-2-7B", "a100", 1, "throughput", 52,
              2048, 128, 591.0, f"TensorRT-LLM v0.6.1 gptSessionBenchmark, FP16, 1x {A100}, static batch 52, "
              "input 2048, output 128: output tok/s", TRTLLM_PERF),
)


def static_batch_seconds(model: CostModel, batch: int, input_len: int, output_len: int) -> float:
    """One prefill step of `batch` prompts, then output_len - 1 decode steps (the first token comes from prefill)."""
    total = model.step_seconds([ChunkShape(input_len, input_len)] * batch)
    for i in range(1, output_len):
        total += model.decode_step_seconds(batch, input_len + i)
    return total


def modelled(ref: Reference) -> float:
    """The cost model's figure for a reference point, in the reference's unit."""
    model = CostModel(ref.model, hardware(ref.hardware), tensor_parallel=ref.tensor_parallel)
    if ref.how == "decode":
        return model.decode_step_seconds(ref.batch, ref.input_len) * 1e3
    if ref.how == "ttft":
        return model.prefill_seconds(ref.input_len) * 1e3
    seconds = static_batch_seconds(model, ref.batch, ref.input_len, ref.output_len)
    if ref.how == "latency":
        return seconds * 1e3
    return ref.batch * ref.output_len / seconds


def speed_ratio(ref: Reference, value: float) -> float:
    """Modelled speed over measured speed: > 1 means the model is faster (optimistic) than the measurement."""
    return value / ref.published if ref.how == "throughput" else ref.published / value


def constants() -> str:
    return (f"COMPUTE_EFFICIENCY={cost_model.COMPUTE_EFFICIENCY}  MEMORY_EFFICIENCY={cost_model.MEMORY_EFFICIENCY}  "
            f"STEP_OVERHEAD_S={cost_model.STEP_OVERHEAD_S}  ALLREDUCE_LATENCY_S={cost_model.ALLREDUCE_LATENCY_S}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table with the sources")
    args = parser.parse_args()
    rows = [(ref, modelled(ref)) for ref in REFERENCES]
    print(constants())
    if args.markdown:
        print("\n| # | reference point | model | GPUs | measure | cost model | published | speed ratio |")
        print("|---:|---|---|---|---|---:|---:|---:|")
        for i, (ref, value) in enumerate(rows, 1):
            gpus = f"{ref.tensor_parallel}x {ref.hardware}"
            print(f"| {i} | {ref.label} | {ref.model_name} | {gpus} | {ref.how} ({ref.unit}) | {value:,.1f} | "
                  f"{ref.published:,.1f} | {speed_ratio(ref, value):.2f} |")
        print("\nConditions and sources:\n")
        for i, (ref, _) in enumerate(rows, 1):
            print(f"{i}. {ref.conditions}. Source: {ref.source}")
    else:
        print(f"\n{'reference point':<36} {'measure':<18} {'model':>10} {'published':>10} {'speed ratio':>12}")
        for ref, value in rows:
            print(f"{ref.label:<36} {ref.how + ' (' + ref.unit + ')':<18} {value:>10,.1f} {ref.published:>10,.1f} "
                  f"{speed_ratio(ref, value):>12.2f}")
        print("\nspeed ratio = modelled speed / published speed (>1: the model is optimistic). Sources:")
        for ref, _ in rows:
            print(f"- {ref.label}: {ref.conditions}. {ref.source}")
    within = sum(0.8 <= speed_ratio(ref, value) <= 1.25 for ref, value in rows)
    print(f"\n{within} of {len(rows)} points within 0.80-1.25")


if __name__ == "__main__":
    main()
