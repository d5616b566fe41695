"""What the controller and the report see of the fast simulation (`bench.fast_simulator`), as `bench.sim_views` is
for the exact one: a worker's observation, read off its model as the live heartbeat reads an engine, and the
requests' records."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pdserve.bench.fast_workers import PrefillWorker, Worker
from pdserve.bench.metrics import RequestRecord
from pdserve.bench.workloads import TraceEntry
from pdserve.controller.observation import PoolRole, WorkerObservation


def worker_observation(worker: Worker, now: float, moving_to: PoolRole | None, leaving: bool) -> WorkerObservation:
    """As `sim_views.worker_observation` reads an engine's load; `moving_to`: the pool a moved worker joins;
    `leaving`: it drains to be removed."""
    if isinstance(worker, PrefillWorker):
        running, waiting, queued, used = worker.observe()
    else:
        running, waiting, queued, used = worker.observe(now)
    in_transition = worker.draining or not worker.available
    joining = (moving_to or worker.role) if in_transition and not leaving else None
    return WorkerObservation(worker_id=worker.worker_id, role=worker.role, draining=in_transition, joining=joining,
                             leaving=leaving,
                             running=running, waiting=waiting, queued_prefill_tokens=queued, kv_blocks_used=used,
                             kv_blocks_total=worker.shape.num_blocks)


def records(trace: Sequence[TraceEntry], done: Sequence[int], dispatched: Sequence[float], first: Sequence[float],
            last: Sequence[float]) -> tuple[RequestRecord, ...]:
    """The finished requests (`done`, by index into `trace`) in the order they finished, then those lost at the
    horizon; the times are per request index."""
    out = []
    for i in done:
        e = trace[i]
        tpot = (last[i] - first[i]) / (e.output_tokens - 1) if e.output_tokens > 1 else 0.0
        out.append(RequestRecord(f"r{i}", e.arrival_s, e.input_tokens, e.output_tokens, dispatched[i] - e.arrival_s,
                                 first[i] - e.arrival_s, tpot, last[i] - e.arrival_s, (), True))
    finished, nan = set(done), math.nan
    out += [RequestRecord(f"r{i}", e.arrival_s, e.input_tokens, int(not math.isnan(first[i])), nan, nan, nan, nan, (),
                          False, "unfinished at the horizon")
            for i, e in enumerate(trace) if i not in finished]
    return tuple(out)
