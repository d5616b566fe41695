"""Benchmark: one decode step's worth of matmuls on the CPU, by weight layout and batch size.

    python -m pdserve.bench.cpu_gemm_layouts [--shape smollm2-135m] [--threads 2]

Runs every layer's q/k/v, o, gate/up and down projections plus the LM head, each layer with its own random
weights (so they stream from memory as in a real step), for M = 1, 16, 64 rows, three ways:
`x @ W` with W [in, out] (ours), `F.linear(x, W)` with W [out, in] (nn.Linear, transformers), and `W @ x.T`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pdserve.engine.shapes import shape


def step_time(fn: Callable[[], None], repeats: int = 5) -> float:
    for _ in range(2):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = shape(args.shape)
    dims = [(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size), (cfg.q_size, cfg.hidden_size),
            (cfg.hidden_size, 2 * cfg.intermediate_size), (cfg.intermediate_size, cfg.hidden_size)]
    in_out = [[torch.randn(i, o) for i, o in dims] for _ in range(cfg.num_layers)] + [
        [torch.randn(cfg.hidden_size, cfg.vocab_size)]]
    out_in = [[w.t().contiguous() for w in ws] for ws in in_out]
    ways = {
        "x @ W[in,out]": lambda x, w_io, w_oi: x @ w_io,
        "F.linear(x, W[out,in])": lambda x, w_io, w_oi: F.linear(x, w_oi),
        "W[out,in] @ x.T": lambda x, w_io, w_oi: w_oi @ x.t(),
    }
    print(f"{args.shape}, {args.threads} threads, fp32: ms per step of matmuls (all layers + LM head)")
    print(f"{'rows':>5s} " + " ".join(f"{name:>24s}" for name in ways))
    with torch.inference_mode():
        for rows in (1, 16, 64):
            inputs = {i: torch.randn(rows, i) for i in {w.shape[0] for ws in in_out for w in ws}}

            def run(way, inputs=inputs) -> None:
                for ws_io, ws_oi in zip(in_out, out_in):
                    for w_io, w_oi in zip(ws_io, ws_oi):
                        way(inputs[w_io.shape[0]], w_io, w_oi)

            times = [step_time(lambda way=way: run(way)) * 1e3 for way in ways.values()]
            print(f"{rows:5d} " + " ".join(f"{t:24.1f}" for t in times))


if __name__ == "__main__":
    main()
