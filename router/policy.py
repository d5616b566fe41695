"""Which workers a request goes to. Pure functions of what the router knows; ties break by worker id so a choice
is reproducible.

- decode: the most free KV blocks, then the fewest running requests (admission happens where the memory is);
- prefill: the fewest prompt tokens queued, counting what this router has sent and not yet seen back (fresher than
  the heartbeat) and then the heartbeat's own count;
- colocated: as decode.

KV-aware (`Affinity` given, and some candidate holds a leading block of the prompt): each candidate's cost weighs
what it would have to do for this prompt against its load, `weight` being `router.cache_weight`:

    prefill: queued prompt tokens + weight * prompt tokens it would compute (those past its cached prefix)
    decode:  share of its KV blocks in use + weight * share of the prompt's blocks it would receive

and the cheapest wins (then the orders above). When no candidate holds any of the prompt, or the weight is 0, the
choice is the load-only one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pdserve.registry.entries import WorkerInfo


@dataclass(frozen=True)
class Affinity:
    """What a router knows of one prompt's cached prefix on each worker (`router.kv_index`)."""

    prompt_tokens: int
    shareable_blocks: int
    """The prompt's blocks that a cache may hold (`prefix_hash.shareable_blocks`)."""
    block_size: int
    cached_blocks: Mapping[str, int]
    """Worker id -> leading blocks of the prompt it holds (absent: none)."""
    weight: float
    hashes: tuple[int, ...] = ()
    """The prompt's shareable blocks' hashes."""

    def applies(self, candidates: Sequence[WorkerInfo]) -> bool:
        """Whether the cost decides: a weight above 0 and some candidate holding part of the prompt."""
        return self.weight > 0 and any(self.cached_blocks.get(w.worker_id, 0) for w in candidates)

    def uncached_tokens(self, worker_id: str) -> int:
        return self.prompt_tokens - self.cached_blocks.get(worker_id, 0) * self.block_size

    def uncached_share(self, worker_id: str) -> float:
        if self.shareable_blocks == 0:
            return 1.0
        return 1.0 - self.cached_blocks.get(worker_id, 0) / self.shareable_blocks


def pick_decode(candidates: Sequence[WorkerInfo], affinity: Affinity | None = None) -> WorkerInfo | None:
    if not candidates:
        return None
    if affinity is not None and affinity.applies(candidates):
        return min(candidates, key=lambda w: (_used_share(w) + affinity.weight * affinity.uncached_share(w.worker_id),
                                              -w.kv_blocks_free, w.running, w.worker_id))
    return min(candidates, key=lambda w: (-w.kv_blocks_free, w.running, w.worker_id))


def pick_prefill(candidates: Sequence[WorkerInfo], in_flight_tokens: Mapping[str, int],
                 affinity: Affinity | None = None) -> WorkerInfo | None:
    if not candidates:
        return None
    if affinity is not None and affinity.applies(candidates):
        return min(candidates, key=lambda w: (
            in_flight_tokens.get(w.worker_id, 0) + w.queued_prefill_tokens
            + affinity.weight * affinity.uncached_tokens(w.worker_id), w.running, w.worker_id))
    return min(candidates, key=lambda w: (in_flight_tokens.get(w.worker_id, 0), w.queued_prefill_tokens, w.running,
                                          w.worker_id))


def _used_share(worker: WorkerInfo) -> float:
    return worker.kv_blocks_used / worker.kv_blocks_total if worker.kv_blocks_total else 1.0
