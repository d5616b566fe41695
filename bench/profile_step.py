"""Profile one engine step: where a decode step's time goes, per ATen op.

    python -m pdserve.bench.profile_step [--batch 16] [--model smollm2-135m-instruct] [--rows 12]
        [--quantization none|int8|int4|w8a8] [--dtype fp32|bf16] [--compile]

Starts `batch` requests with 32-token prompts, decodes a few steps, then times 20 steps and prints torch.profiler's
table for 10 more.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pdserve.engine import Engine, EngineConfig, SamplingParams
from pdserve.engine.config import DTYPES, QUANTIZATIONS
from pdserve.engine.model_source import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantization", default="none", choices=QUANTIZATIONS)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--compile", action="store_true", help="engine.compile on (the engine compiles as it starts)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(EngineConfig(model=args.model, num_kv_blocks=1024, prefix_caching=False,
                                  quantization=args.quantization, dtype=args.dtype, compile=args.compile))
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", [100 + i + j for j in range(32)], params)
    for _ in range(5):
        engine.step()
    start = time.perf_counter()
    for _ in range(20):
        engine.step()
    step = (time.perf_counter() - start) / 20
    print(f"batch {args.batch}: {step * 1e3:.1f} ms per decode step, {args.batch / step:.1f} tok/s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
