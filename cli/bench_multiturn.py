"""`pdserve bench --workload multiturn`: conversations that send their whole history every turn (`bench.multiturn`),
against a running cluster, with the prefix-cache figures that workload is for.

    pdserve bench --workload multiturn [--conversations 8] [--turns 6] [--system-tokens 1024] [--message-tokens 128]
                  [--max-output-tokens 64] [--concurrency 4] [--json]

The workers' figures (prompt tokens computed, KV bytes moved and not sent, hit rate) come from the router's
/metrics/workers, when the cluster serves HTTP (the state file's address, or --metrics-url).
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc

MULTITURN_DEFAULTS = {"conversations": 8, "turns": 6, "system_tokens": 1024, "message_tokens": 128,
                      "max_output_tokens": 64, "concurrency": 4}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conversations", type=int, help="multiturn: conversations (default 8)")
    p.add_argument("--turns", type=int, help="multiturn: turns per conversation (default 6)")
    p.add_argument("--system-tokens", type=int, help="multiturn: the shared system prompt's length (default 1024)")
    p.add_argument("--message-tokens", type=int, help="multiturn: each new user message's length (default 128)")
    p.add_argument("--metrics-url", help="multiturn: the router's /metrics/workers (default: the running cluster's)")


def run_multiturn_bench(args: argparse.Namespace, address: str) -> int:
    from pdserve.bench.multiturn import MultiturnSpec, run_multiturn

    def given(name: str):
        value = getattr(args, name)
        return MULTITURN_DEFAULTS[name] if value is None else value

    spec = MultiturnSpec(conversations=given("conversations"), turns=given("turns"),
                         system_tokens=given("system_tokens"), message_tokens=given("message_tokens"),
                         output_tokens=given("max_output_tokens"), concurrency=given("concurrency"),
                         vocab_size=args.vocab_size, seed=args.seed, timeout_s=args.timeout_s)
    try:
        report = run_multiturn(address, spec, args.metrics_url or _metrics_url())
    except grpc.RpcError as e:
        print(f"pdserve bench: a turn failed: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    summary = report.summary()
    if args.json:
        print(json.dumps({"spec": spec.__dict__, "summary": summary,
                          "turns": [t.__dict__ for t in report.turns]}, indent=1))
        return 0
    print(f"{summary['turns']} turns in {summary['wall_s']:.1f} s: TTFT p50 {summary['ttft_p50_s']:.3f} s, "
          f"p90 {summary['ttft_p90_s']:.3f} s (after the first turn: p50 {summary['later_ttft_p50_s']:.3f} s, "
          f"p90 {summary['later_ttft_p90_s']:.3f} s)")
    print(f"prompt tokens {summary['prompt_tokens']}, served from prefix caches {summary['cached_tokens']} "
          f"(prefill workers' hit rate {summary['hit_rate']:.3f}); prompt tokens computed "
          f"{summary['prefill_tokens_computed']:.0f}; KV moved {summary['kv_bytes_moved'] / 1e6:.1f} MB, not sent "
          f"{summary['kv_bytes_not_sent'] / 1e6:.1f} MB")
    return 0


def _metrics_url() -> str | None:
    from pdserve.cli.cluster_state import NoCluster, read_state

    try:
        state = read_state()
    except (NoCluster, OSError, ValueError, TypeError):
        return None
    return f"http://{state.http_address}/metrics/workers" if state.http_address else None
