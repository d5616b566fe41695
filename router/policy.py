"""Which workers a request goes to. Pure functions of what the router knows; ties break by worker id so a choice
is reproducible.

- decode: the most free KV blocks, then the fewest running requests (admission happens where the memory is);
- prefill: the fewest prompt tokens queued, counting what this router has sent and not yet seen back (fresher than
  the heartbeat) and then the heartbeat's own count;
- colocated: as decode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pdserve.registry.entries import WorkerInfo


def pick_decode(candidates: Sequence[WorkerInfo]) -> WorkerInfo | None:
    if not candidates:
        return None
    return min(candidates, key=lambda w: (-w.kv_blocks_free, w.running, w.worker_id))


def pick_prefill(candidates: Sequence[WorkerInfo], in_flight_tokens: Mapping[str, int]) -> WorkerInfo | None:
    if not candidates:
        return None
    return min(candidates, key=lambda w: (in_flight_tokens.get(w.worker_id, 0), w.queued_prefill_tokens, w.running,
                                          w.worker_id))
