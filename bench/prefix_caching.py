"""What prefix caching and KV-aware routing are worth on a live cluster: the multi-turn workload
(`bench.multiturn`) on 2 prefill + 2 decode workers (SmolLM2-135M, CPU), under three settings side by side, each on a
cluster of its own started for it:

    none      engine.prefix_caching false (every turn's whole history computed and sent)
    load      prefix caching on, router.routing load (today's load-only choice of workers)
    kv_aware  prefix caching on, router.routing kv_aware (workers chosen by what they cache, weighed against load)

    python -m pdserve.bench.prefix_caching [--conversations 8] [--turns 6] [--json]

Per setting: TTFT p50/p90 (all turns; turns after the first), prompt tokens the prefill workers computed, KV bytes
the handoffs moved and those not sent, and the prefill workers' prefix-cache hit rate; then the ratios against
`none` (TTFT, KV bytes) and `load` (hit rate).
"""

from __future__ import annotations

import argparse
import json
import tempfile

from pdserve.bench.local_cluster import RunningCluster, start_cluster, stop_cluster
from pdserve.bench.multiturn import MultiturnSpec, run_multiturn

SETTINGS = {
    "none": ({"prefix_caching": False}, "load"),
    "load": ({"prefix_caching": True}, "load"),
    "kv_aware": ({"prefix_caching": True}, "kv_aware"),
}
"""Name -> (engine settings, router.routing)."""
ENGINE = {"num_kv_blocks": 1536, "max_num_batched_tokens": 512}
WORKERS = {"prefill": {"count": 2, "resources": {"cpus": 0.5}}, "decode": {"count": 2, "resources": {"cpus": 0.5}}}


def cluster_config(setting: str) -> dict:
    engine, routing = SETTINGS[setting]
    return {"engine": {**ENGINE, **engine}, "workers": WORKERS, "router": {"routing": routing}}


def measure(setting: str, spec: MultiturnSpec) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"pdserve-prefix-{setting}-") as state_dir:
        cluster: RunningCluster = start_cluster(state_dir, cluster_config(setting))
        try:
            metrics_url = cluster.http_url.removesuffix("/v1") + "/metrics/workers"
            report = run_multiturn(cluster.address, spec, metrics_url)
        finally:
            stop_cluster(cluster)
    return report.summary()


def compare(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The issue's ratios: TTFT p50 without caching over with it, KV bytes saved, KV-aware hit rate over load's."""
    none, load, aware = results.get("none"), results.get("load"), results.get("kv_aware")
    ratios = {}
    if none and aware:
        ratios["ttft_p50_none_over_kv_aware"] = none["ttft_p50_s"] / aware["ttft_p50_s"]
        ratios["later_ttft_p50_none_over_kv_aware"] = none["later_ttft_p50_s"] / aware["later_ttft_p50_s"]
        ratios["kv_bytes_kv_aware_over_none"] = aware["kv_bytes_moved"] / none["kv_bytes_moved"]
    if none and load:
        ratios["ttft_p50_none_over_load"] = none["ttft_p50_s"] / load["ttft_p50_s"]
        ratios["kv_bytes_load_over_none"] = load["kv_bytes_moved"] / none["kv_bytes_moved"]
    if load and aware and load["hit_rate"]:
        ratios["hit_rate_kv_aware_over_load"] = aware["hit_rate"] / load["hit_rate"]
    return ratios


def print_table(results: dict[str, dict[str, float]], ratios: dict[str, float]) -> None:
    print(f"{'setting':<10}{'TTFT p50':>9}{'p90':>8}{'later p50':>10}{'p90':>8}{'computed':>10}{'cached':>9}"
          f"{'KV MB moved':>12}{'not sent':>10}{'hit rate':>9}{'wall s':>8}")
    for name, r in results.items():
        print(f"{name:<10}{r['ttft_p50_s']:>9.3f}{r['ttft_p90_s']:>8.3f}{r['later_ttft_p50_s']:>10.3f}"
              f"{r['later_ttft_p90_s']:>8.3f}{r['prefill_tokens_computed']:>10.0f}{r['cached_tokens']:>9.0f}"
              f"{r['kv_bytes_moved'] / 1e6:>12.1f}{r['kv_bytes_not_sent'] / 1e6:>10.1f}{r['hit_rate']:>9.3f}"
              f"{r['wall_s']:>8.1f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pdserve.bench.prefix_caching", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--message-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="which settings, comma-separated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    spec = MultiturnSpec(args.conversations, args.turns, args.system_tokens, args.message_tokens, args.output_tokens,
                         args.concurrency)
    results = {name: measure(name, spec) for name in args.settings.split(",")}
    ratios = compare(results)
    if args.json:
        print(json.dumps({"spec": spec.__dict__, "results": results, "ratios": ratios}, indent=1))
    else:
        print_table(results, ratios)


if __name__ == "__main__":
    main()
