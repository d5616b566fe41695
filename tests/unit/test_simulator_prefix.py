"""The planner's simulator with shared prefixes (trace entries with prefix_id/prefix_tokens): the sim engines' prefix
caches reuse them, KV-aware routing follows them, and a decode worker's cached prefix is not sent again."""

import dataclasses

from pdserve.bench.metrics import SLO, percentiles
from pdserve.bench.sim_setup import SimSetup
from pdserve.bench.simulator import Simulation
from pdserve.bench.workloads import TraceEntry, make_prompt_ids
from pdserve.engine import EngineConfig
from pdserve.engine.config import SimSettings

SIM = EngineConfig(backend="sim", model="llama-3-8b", sim=SimSettings(hardware="h100"), max_num_seqs=128,
                   max_num_batched_tokens=4096)
SLO_ = SLO(ttft_s=1.0, tpot_s=0.05)


def shared_trace(n: int = 60, documents: int = 4, gap_s: float = 0.1) -> list[TraceEntry]:
    """Questions about a few long documents: 3000 shared tokens, 100 of each question's own."""
    return [TraceEntry(i * gap_s, 3100, 20, prefix_id=i % documents, prefix_tokens=3000) for i in range(n)]


def run(trace, caching: bool = True, routing: str = "kv_aware"):
    engine = dataclasses.replace(SIM, prefix_caching=caching)
    return Simulation(SimSetup(engine, prefill=2, decode=2, slo=SLO_, routing=routing), trace).run()


def test_prompts_of_one_prefix_id_share_their_prefix_and_nothing_else():
    a, b, c = (make_prompt_ids(0, i, entry, 32000) for i, entry in enumerate(shared_trace(3, documents=2)))
    assert a[:3000] == c[:3000] and a[3000:] != c[3000:]
    assert a[:16] != b[:16]  # another document from the first block on


def test_caching_serves_most_of_a_shared_prefix_and_lowers_ttft():
    trace = shared_trace()
    cached, plain = run(trace), run(trace, caching=False)
    assert all(r.ok for r in cached.records) and all(r.ok for r in plain.records)
    assert plain.cached_tokens == 0
    assert cached.cache_hit_rate > 0.8  # each document's prefix is computed about once per prefill worker
    ttft = {name: percentiles(r.ttft_s for r in result.records)["p50"] for name, result in (("cached", cached),
                                                                                              ("plain", plain))}
    assert ttft["cached"] < ttft["plain"] / 2


def test_kv_aware_routing_hits_the_cache_more_than_load_only_routing():
    trace = shared_trace(80, documents=8, gap_s=0.05)  # busy enough that load-only routing spreads each document
    aware, load = run(trace), run(trace, routing="load")
    ideal = 72 * 3000 / (80 * 3100)  # each document computed once
    assert aware.cache_hit_rate > 0.99 * ideal > load.cache_hit_rate * 1.05
