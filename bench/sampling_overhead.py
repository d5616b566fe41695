"""What logprobs and the logit changes (penalties, bias) cost per decoded token, side by side on one engine.

    python -m pdserve.bench.sampling_overhead [--batch 16] [--tokens 64] [--rounds 3]

The local engine (SmolLM2 by default) decodes `batch` requests of `tokens` greedy tokens at once, for each setting
in turn, `rounds` times (A B C A B C ...: a noisy machine's drift falls on all alike). Printed: tokens per second of
each setting (median over rounds) and its ratio to plain greedy decoding.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pdserve.engine import Engine, EngineConfig, SamplingParams

SETTINGS = {
    "plain": {},
    "logprobs=5": {"logprobs": 5},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2},
    "logit_bias x10": {"logit_bias": tuple((i, 1.0) for i in range(100, 110))},
}


def decode_rate(engine: Engine, batch: int, tokens: int, extra: dict) -> float:
    sampling = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, **extra)
    prompts = [[100 + i, 200 + i, 300 + i, 400 + i] for i in range(batch)]
    began = time.perf_counter()
    engine.generate(prompts, sampling)
    return batch * tokens / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None, help="engine.model (default: the engine's default)")
    args = parser.parse_args()
    config = EngineConfig(prefix_caching=False, **({"model": args.model} if args.model else {}))
    engine = Engine(config)
    decode_rate(engine, args.batch, 8, {})  # warm up
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, extra in SETTINGS.items():
            rates[name].append(decode_rate(engine, args.batch, args.tokens, extra))
    plain = statistics.median(rates["plain"])
    print(f"{config.model}, batch {args.batch}, {args.tokens} tokens each, median of {args.rounds} rounds")
    print("| setting | tok/s | vs plain |")
    print("|---|---:|---:|")
    for name, found in rates.items():
        median = statistics.median(found)
        print(f"| {name} | {median:.1f} | {median / plain:.2f}x |")


if __name__ == "__main__":
    main()
