"""What the OpenAI-compatible HTTP API costs next to gRPC: the same closed-loop load on one running cluster, sent
in alternating rounds over each API, with client-side TTFT, TPOT and throughput per API and their ratio.

    python -m pdserve.bench.api_overhead --grpc 127.0.0.1:50051 --http 127.0.0.1:8000 \\
        --rounds 3 --requests 16 --concurrency 4 --input-tokens 128 --output-tokens 32

Rounds alternate (grpc, openai, grpc, ...) so that drift on a noisy machine hits both alike. Every request is the
same shape: token-id prompt, greedy, EOS ignored; each round uses fresh prompts (no prefix reuse).
"""

from __future__ import annotations

import argparse
import json
import math

from pdserve.bench.load_generator import LoadConfig, LoadGenerator
from pdserve.bench.metrics import RequestRecord, percentiles
from pdserve.bench.workloads import TraceEntry


def run_round(api: str, address: str, args: argparse.Namespace, seed: int) -> tuple[list[RequestRecord], float]:
    trace = [TraceEntry(0.0, args.input_tokens, args.output_tokens) for _ in range(args.requests)]
    config = LoadConfig(router=address, api=api, concurrency=args.concurrency, timeout_s=args.timeout_s,
                        seed=seed, progress=False, vocab_size=args.vocab_size)
    result = LoadGenerator(config).run(trace)
    return list(result.records), result.duration_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.bench.api_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc", required=True, metavar="HOST:PORT")
    parser.add_argument("--http", required=True, metavar="HOST:PORT")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16, help="per round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    records: dict[str, list[RequestRecord]] = {"grpc": [], "openai": []}
    seconds = {"grpc": 0.0, "openai": 0.0}
    for number in range(args.rounds):
        for api, address in (("grpc", args.grpc), ("openai", args.http)):
            got, duration = run_round(api, address, args, seed=1000 * number + (api == "openai"))
            records[api] += got
            seconds[api] += duration
    table = {api: _figures(rs, seconds[api]) for api, rs in records.items()}
    table["openai/grpc"] = {k: table["openai"][k] / table["grpc"][k] if table["grpc"][k] else math.nan
                            for k in table["grpc"]}
    if args.json:
        print(json.dumps(table))
        return 0
    print(f"{'':14}" + "".join(f"{k:>14}" for k in table["grpc"]))
    for api, row in table.items():
        print(f"{api:14}" + "".join(f"{v:14.3f}" for v in row.values()))
    return 0


def _figures(records: list[RequestRecord], seconds: float) -> dict[str, float]:
    ok = [r for r in records if r.ok]
    ttft = percentiles((r.ttft_s for r in ok), (50, 90))
    tpot = percentiles((r.tpot_s for r in ok), (50, 90))
    return {"ok": len(ok), "failed": len(records) - len(ok), "ttft_p50_ms": 1000 * ttft["p50"],
            "ttft_p90_ms": 1000 * ttft["p90"], "tpot_p50_ms": 1000 * tpot["p50"], "tpot_p90_ms": 1000 * tpot["p90"],
            "output_tok_s": sum(r.output_tokens for r in ok) / seconds if seconds else math.nan}



if __name__ == "__main__":
    raise SystemExit(main())
