"""Benchmark: our engine vs llama.cpp (llama-cpp-python) at batch 1, side by side in one process, same GGUF file,
same threads.

    python -m pdserve.bench.engine_vs_llamacpp [--tokens 64] [--repeats 3] [--quantization none int8 int4 w8a8]
        [--compile]

llama.cpp computes on the file's own quantised blocks (SmolLM2's Q4_1/Q8_0); we load them as fp32 and, with
`--quantization`, re-quantise to our int8/int4 layouts. Both decode one request token by token (llama.cpp through
`Llama.eval`, one token per call, which is its own decode step; EOS plays no part) and prefill one 512-token prompt.
llama-cpp-python is not a pdserve dependency: install it to run this (BENCHMARKS.md gives the build flags that run
on dev-cpu).
"""

from __future__ import annotations

import argparse
import os

import torch

from pdserve.bench.engine_vs_transformers import Ours, Row, decode_rate, make_prompts, prefill_rate
from pdserve.engine import Engine, EngineConfig
from pdserve.engine.config import QUANTIZATIONS
from pdserve.engine.model_source import DEFAULT_MODEL, default_gguf_path


class LlamaCpp:
    def __init__(self, gguf_path: str, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf_path, n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                         n_batch=512, verbose=False)

    def generate(self, prompts: list[list[int]], tokens: int) -> None:
        """Prefill the one prompt, then `tokens - 1` single-token decode steps (as ours: the first token comes
        from the prefill)."""
        [prompt] = prompts
        self.llm.reset()
        self.llm.eval(prompt)
        for i in range(tokens - 1):
            self.llm.eval([prompt[i % len(prompt)]])


def run(args: argparse.Namespace) -> list[Row]:
    torch.set_num_threads(args.threads)
    engines = {q: Engine(EngineConfig(model=DEFAULT_MODEL, num_kv_blocks=256, quantization=q,
                                       prefix_caching=False, compile=args.compile))
               for q in args.quantization}
    ours = {q: Ours(e) for q, e in engines.items()}
    theirs = LlamaCpp(default_gguf_path(), args.threads)
    first = next(iter(engines.values()))
    prompt = make_prompts(first, 1, 32)
    long_prompt = make_prompts(first, 1, 512)[0]
    for system in (*ours.values(), theirs):
        system.generate(prompt, 4)
    rows = []
    for name, rate in (("decode tok/s, 1 request", lambda s: decode_rate(s, prompt, args.tokens, args.repeats)),
                       ("prefill tok/s, 512-token prompt", lambda s: prefill_rate(s, long_prompt, args.repeats))):
        baseline = rate(theirs)
        for q, system in ours.items():
            rows.append(Row(f"{name} [{q}]", rate(system), baseline))
            print(f"  {rows[-1].name}: ours {rows[-1].ours:.1f}, llama.cpp {baseline:.1f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--quantization", nargs="+", default=["none", "int8", "int4"],
                        choices=QUANTIZATIONS)
    parser.add_argument("--compile", action="store_true", help="our engines with engine.compile on")
    args = parser.parse_args()
    rows = run(args)
    print(f"\n{args.threads} threads, torch {torch.__version__}, {DEFAULT_MODEL} ({default_gguf_path()}), "
          f"compile {args.compile}")
    print(f"{'measure':40s} {'ours':>8s} {'llama.cpp':>10s} {'ratio':>7s}")
    for row in rows:
        print(f"{row.name:40s} {row.ours:8.1f} {row.baseline:10.1f} {row.ratio:6.2f}x")


if __name__ == "__main__":
    main()
