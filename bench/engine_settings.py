"""Benchmark: our engine against itself under other settings (eager vs torch.compile), side by side in one run.

    python -m pdserve.bench.engine_settings [--quantization none int4] [--tokens 32] [--repeats 3]

For each quantisation, an eager and a compiled (`engine.compile`) engine on the default model decode 1 and 16
requests (equal lengths, EOS ignored), alternating, median of `--repeats`; the compiled engine's start (where it
compiles its decode graphs) is timed as its compile cost.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from pdserve.bench.engine_vs_transformers import Ours, Row, decode_rate, make_prompts
from pdserve.engine import Engine, EngineConfig
from pdserve.engine.config import QUANTIZATIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantization", nargs="+", default=["none", "int4"], choices=QUANTIZATIONS)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for q in args.quantization:
        eager = Ours(Engine(EngineConfig(quantization=q, num_kv_blocks=512, prefix_caching=False)))
        start = time.perf_counter()
        compiled = Ours(Engine(EngineConfig(quantization=q, num_kv_blocks=512, compile=True,
                                                prefix_caching=False)))
        print(f"  [{q}] compiled engine's start (loading and compiling its decode graphs): "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        prompts = make_prompts(eager.engine, 16, 32)
        for system in (eager, compiled):
            system.generate(prompts[:2], 4)
        for batch in (1, 16):
            rates = [decode_rate(s, prompts[:batch], args.tokens, args.repeats) for s in (compiled, eager)]
            rows.append(Row(f"decode tok/s, {batch} concurrent [{q}]", *rates))
            print(f"  {rows[-1].name}: compiled {rates[0]:.1f}, eager {rates[1]:.1f}", flush=True)
    print(f"\n{args.threads} threads, torch {torch.__version__}")
    print(f"{'measure':40s} {'compiled':>9s} {'eager':>8s} {'ratio':>7s}")
    for row in rows:
        print(f"{row.name:40s} {row.ours:9.1f} {row.baseline:8.1f} {row.ratio:6.2f}x")


if __name__ == "__main__":
    main()
