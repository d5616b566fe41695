"""What structured output costs per decoded token, side by side on one engine.

    python -m pdserve.bench.structured_overhead [--batch 16] [--tokens 64] [--rounds 3]

The local engine (SmolLM2 by default) decodes `batch` requests of `tokens` greedy tokens at once, for each setting
in turn, `rounds` times (A B C A B C ...: a noisy machine's drift falls on all alike). Each spec is built so that it
cannot be complete before `tokens` tokens (a JSON array with a minimum of items, a regex with a minimum of words), so
every setting decodes the same batch for the same number of steps. Printed: tokens per second of each setting
(median over rounds), its ratio to unconstrained decoding, and the time the first request of a new spec waits for
its grammar (compiled once per spec, then cached).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pdserve.engine import Engine, EngineConfig, SamplingParams
from pdserve.engine.structured_output import GuideKind, StructuredOutput

PEOPLE = {"type": "object", "required": ["people"], "properties": {"people": {
    "type": "array", "minItems": 16, "items": {
        "type": "object", "required": ["name", "age"],
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}}}}
SETTINGS = {
    "unconstrained": None,
    "json_schema (array of 16+ objects)": StructuredOutput(GuideKind.JSON, json.dumps(PEOPLE)),
    "regex ([a-z]+ ){64,}": StructuredOutput(GuideKind.REGEX, "([a-z]+ ){64,}"),
}


def decode_rate(engine: Engine, batch: int, tokens: int, structured: StructuredOutput | None) -> tuple[float, int]:
    """(tokens per second, requests that stopped before `tokens`)."""
    sampling = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, structured_output=structured)
    prompts = [[100 + i, 200 + i, 300 + i, 400 + i] for i in range(batch)]
    began = time.perf_counter()
    outputs = engine.generate(prompts, sampling)
    elapsed = time.perf_counter() - began
    return sum(len(o.token_ids) for o in outputs) / elapsed, sum(len(o.token_ids) < tokens for o in outputs)


def first_request_wait(engine: Engine) -> float:
    """Seconds for a one-token request with a schema never seen before (compile + first mask)."""
    schema = dict(PEOPLE, title=f"fresh-{time.monotonic_ns()}")  # a new text: not in the compile cache
    began = time.perf_counter()
    engine.generate([[100, 200]], SamplingParams(max_tokens=1, temperature=0, structured_output=StructuredOutput(
        GuideKind.JSON, json.dumps(schema))))
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None, help="engine.model (default: the engine's default)")
    args = parser.parse_args()
    config = EngineConfig(prefix_caching=False, **({"model": args.model} if args.model else {}))
    engine = Engine(config)
    for structured in SETTINGS.values():  # warm up (and build llguidance's tokenizer once)
        decode_rate(engine, 2, 4, structured)
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    short: dict[str, int] = dict.fromkeys(SETTINGS, 0)
    for _ in range(args.rounds):
        for name, structured in SETTINGS.items():
            rate, stopped = decode_rate(engine, args.batch, args.tokens, structured)
            rates[name].append(rate)
            short[name] += stopped
    plain = statistics.median(rates["unconstrained"])
    one_token = statistics.median(decode_rate(engine, 1, 1, None)[0] ** -1 for _ in range(5))
    waits = [first_request_wait(engine) for _ in range(5)]
    print(f"{config.model}, batch {args.batch}, {args.tokens} greedy tokens each, median of {args.rounds} rounds")
    print("| setting | tok/s | vs unconstrained | requests ended early |")
    print("|---|---:|---:|---:|")
    for name, found in rates.items():
        median = statistics.median(found)
        print(f"| {name} | {median:.1f} | {median / plain:.2f}x | {short[name]} |")
    print(f"one-token request with a new schema: {statistics.median(waits) * 1000:.1f} ms "
          f"(without a schema: {one_token * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
