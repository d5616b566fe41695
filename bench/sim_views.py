"""What the live router's policy and the ratio controller see of a simulated worker, built from its engine: its
heartbeat (`WorkerInfo`), its controller observation, and KV-aware routing's view of a prompt (read off the engines'
own prefix caches: a router's index without the event lag)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from pdserve.controller.observation import PoolRole, WorkerObservation
from pdserve.engine.engine import Engine
from pdserve.engine.prefix_hash import block_hashes, shareable_blocks
from pdserve.registry.entries import Role, WorkerInfo, WorkerState
from pdserve.router.policy import Affinity

ROLES = {PoolRole.PREFILL: Role.PREFILL, PoolRole.DECODE: Role.DECODE}


class SimWorker(Protocol):
    worker_id: str
    role: PoolRole
    engine: Engine
    draining: bool
    available: bool


def worker_info(w: SimWorker) -> WorkerInfo:
    """What the live router's policy sees of a worker (its heartbeat), built from the engine's load."""
    load = w.engine.load()
    return WorkerInfo(worker_id=w.worker_id, role=ROLES[w.role], actor_name="", pid=0, state=WorkerState.READY,
                      running=load.running + load.held, waiting=load.waiting,
                      queued_prefill_tokens=load.queued_prefill_tokens, kv_blocks_used=load.kv_blocks_used,
                      kv_blocks_total=load.kv_blocks_total)


def worker_observation(w: SimWorker, joining: PoolRole | None, leaving: bool) -> WorkerObservation:
    """`joining`: the pool a worker being moved will serve (a restarting worker's role is already its new one);
    `leaving`: it drains to be removed."""
    load = w.engine.load()
    in_transition = w.draining or not w.available
    return WorkerObservation(worker_id=w.worker_id, role=w.role, draining=in_transition,
                             joining=(joining or w.role) if in_transition and not leaving else None,
                             leaving=leaving,
                             running=load.running + load.held, waiting=load.waiting,
                             queued_prefill_tokens=load.queued_prefill_tokens, kv_blocks_used=load.kv_blocks_used,
                             kv_blocks_total=load.kv_blocks_total)


def prompt_affinity(prompt: Sequence[int], hashes: tuple[int, ...] | None, workers: Iterable[SimWorker],
                    block_size: int, weight: float) -> Affinity:
    """What each worker's prefix cache holds of `prompt`; `hashes`: its shareable blocks' hashes if known (the
    returned Affinity carries them, to be kept)."""
    shareable = shareable_blocks(len(prompt), block_size)
    if hashes is None:
        hashes = tuple(block_hashes(prompt[:shareable * block_size], block_size))
    cached = {w.worker_id: len(w.engine.blocks.cached_prefix(hashes)) for w in workers}
    return Affinity(len(prompt), shareable, block_size, cached, weight, hashes)
