"""How long a request preempted on a decode worker waits to come back, when that worker's KV blocks bind.

    python -m pdserve.bench.preempted_wait [--rates 4 6 8] [--duration 120]

The exact simulator (the real schedulers and router order on a virtual clock): Llama-3-70B at TP 4 on A100s, 3
prefill workers and 1 decode worker, summaries (~4k-token prompts) arriving Poisson at each rate. The decode worker
runs out of KV blocks and preempts its newest requests; each then waits to be recomputed while new reservations
arrive. Printed per rate: each request's longest gap between two tokens (a preempted request's wait shows there),
how many stalled over 10 s, end-to-end latency and TTFT percentiles, and attainment of a 2 s TTFT / 100 ms TPOT SLO.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from pdserve.bench.metrics import SLO, RequestRecord, attainment
from pdserve.bench.sim_setup import SimSetup
from pdserve.bench.simulator import Simulation
from pdserve.bench.workloads import named_trace
from pdserve.engine import EngineConfig
from pdserve.engine.config import SimSettings

ENGINE = EngineConfig(backend="sim", model="llama-3-70b", max_num_seqs=256, prefix_caching=False,
                      sim=SimSettings(hardware="a100", tensor_parallel=4))
SLO_ = SLO(ttft_s=2.0, tpot_s=0.1)
STALL_S = 10.0


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


def row(rate: float, records: Sequence[RequestRecord]) -> str:
    done = [r for r in records if r.ok]
    gaps = [max(r.itl_s, default=0.0) for r in done]
    e2e, ttft = [r.e2e_s for r in done], [r.ttft_s for r in done]
    return (f"| {rate:g} | {len(done)} of {len(records)} | {quantile(gaps, 0.5):.2f} | {quantile(gaps, 0.99):.2f} | "
            f"{max(gaps, default=math.nan):.2f} | {sum(g > STALL_S for g in gaps)} | {quantile(e2e, 0.5):.1f} | "
            f"{quantile(e2e, 0.99):.1f} | {quantile(ttft, 0.99):.1f} | {100 * attainment(records, SLO_):.1f}% |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[4.0, 6.0, 8.0])
    parser.add_argument("--duration", type=float, default=120.0)
    args = parser.parse_args(argv)
    setup = SimSetup(engine=ENGINE, prefill=3, decode=1, slo=SLO_, routing="load")
    print("| rate (req/s) | finished | longest gap p50 (s) | p99 | max | gaps > 10 s | e2e p50 (s) | e2e p99 | "
          "TTFT p99 | attainment |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rate in args.rates:
        result = Simulation(setup, named_trace("summarization", rate, args.duration), record_itl=True).run()
        print(row(rate, result.records), flush=True)


if __name__ == "__main__":
    main()
