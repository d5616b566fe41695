"""The ratio controller on a live cluster: the adapter around the pure `controller.tick`.

Every `interval_s` (in the control plane's event loop):

    observe: the workers from the registry (a worker draining, or being moved, counts as in transition), the last
             `window_s` of the Redis timings stream (what finished: lengths, TTFT/TPOT percentiles, attainment), the
             arrival rate and the arrivals' mean prompt length over the same window (from every router's counters
             in the registry, sampled each tick and taken per router, so a router that starts again from zero
             counts right) and the requests waiting at the routers
    -> tick (pure; the operator's pin from Redis or the config replaces the traffic's target)
    -> record: the decision as JSON on the `decisions` stream (`pdserve status` shows the last ones) and in the log
    -> act (unless dry run): a MOVE drains the worker and restarts it in the other role (`WorkerPool.move`), in the
       background; the controller holds while it is under way.

ADD and REMOVE need a worker budget (`max_workers`/`min_workers` in `ControllerConfig`), which the live config does
not set yet, so the live controller moves workers between roles only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque

import ray
import redis

from pdserve.control_plane.worker_pool import WorkerPool
from pdserve.controller.config import ControllerConfig, ControllerState
from pdserve.controller.controller import tick
from pdserve.controller.decision import Action, Decision
from pdserve.controller.observation import Observation, PoolRole, WorkerObservation
from pdserve.controller.perf_model import PerfModel
from pdserve.controller.window import finished_requests, traffic_window
from pdserve.registry.entries import Role, RouterInfo, WorkerInfo, WorkerState
from pdserve.registry.registry import Registry

log = logging.getLogger(__name__)

_POOL_ROLES = {Role.PREFILL: PoolRole.PREFILL, Role.DECODE: PoolRole.DECODE}
_ROLES = {PoolRole.PREFILL: Role.PREFILL, PoolRole.DECODE: Role.DECODE}


class ControllerLoop:
    def __init__(self, config: ControllerConfig, model: PerfModel, registry: Registry, pool: WorkerPool,
                 window_s: float, dry_run: bool) -> None:
        self.config = config
        self.model = model
        self.registry = registry
        self.pool = pool
        self.window_s = window_s
        self.dry_run = dry_run
        self.state = ControllerState()
        self._moving: dict[str, asyncio.Task] = {}
        self._joining: dict[str, PoolRole] = {}
        """The pool each worker being moved will serve."""
        self._counts: deque[tuple[float, dict[str, RouterInfo]]] = deque()
        """(time, every router's counters by its id) at each tick within the window, oldest first."""
        self._started = time.monotonic()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.tick_once()
            except redis.RedisError as e:
                log.warning("controller: Redis unreadable, skipping this tick: %s", e)

    async def tick_once(self) -> Decision:
        workers, timings, pin, routers = await asyncio.to_thread(self._read)
        config = dataclasses.replace(self.config, pin=pin) if pin is not None else self.config
        observation = self.observe(workers, timings, routers)
        decision = tick(config, self.model, self.state, observation)
        self.state = decision.state
        await asyncio.to_thread(self.registry.append_decision, decision.to_json(), self.dry_run)
        level = logging.INFO if decision.action is Action.HOLD else logging.WARNING
        log.log(level, "controller%s: %s", " (dry run)" if self.dry_run else "", decision.reason)
        if not self.dry_run:
            self._act(decision)
        return decision

    def observe(self, workers: list[WorkerInfo], timings: list[dict[str, str]],
                routers: list[RouterInfo]) -> Observation:
        now = time.monotonic()
        seen = [_worker(w, self._joining.get(w.worker_id)) for w in workers if w.role in _POOL_ROLES]
        present = {w.worker_id for w in seen}
        # a worker being moved is gone from the registry while it restarts: still count it, in transition, joining
        # no known pool (its successor registers under a new id, which would count it twice in `heading`)
        seen += [WorkerObservation(worker_id, _POOL_ROLES[self.pool.specs[worker_id].role], draining=True)
                 for worker_id in self._moving if worker_id not in present and worker_id in self.pool.specs]
        rate, prompt_tokens, classes = self._arrivals(now, {r.router_id: r for r in routers})
        return Observation(now_s=now - self._started, workers=tuple(seen),
                           traffic=traffic_window(finished_requests(timings), rate, self.window_s,
                                                  self.config.slo_ttft_s, self.config.slo_tpot_s,
                                                  sum(r.requests_waiting for r in routers), prompt_tokens, classes))

    def _arrivals(self, now: float, routers: dict[str, RouterInfo]) -> tuple[float, float, tuple[int, ...]]:
        """(requests/s, mean prompt tokens, count per prompt-length class) of the requests accepted over the last
        window_s (as the finished lengths are), not since the last tick: a rate over a few seconds is noisy. Each
        router counts from its own first sighting in the window (a new router, from zero). The prompt length is NaN
        when nothing arrived."""
        self._counts.append((now, routers))
        while len(self._counts) > 2 and self._counts[1][0] <= now - self.window_s:
            self._counts.popleft()
        first_t, first = self._counts[0]
        arrived = prompt_tokens = 0
        classes = [0] * max((len(r.accepted_by_class) for r in routers.values()), default=0)
        for router_id, now_counts in routers.items():
            then = first.get(router_id)
            arrived += now_counts.accepted_total - (then.accepted_total if then else 0)
            prompt_tokens += now_counts.accepted_prompt_tokens - (then.accepted_prompt_tokens if then else 0)
            for i, count in enumerate(now_counts.accepted_by_class[:len(classes)]):
                classes[i] += count - (then.accepted_by_class[i] if then and i < len(then.accepted_by_class) else 0)
        rate = arrived / (now - first_t) if now > first_t else 0.0
        return rate, prompt_tokens / arrived if arrived else math.nan, tuple(classes)

    def _read(self) -> tuple[list[WorkerInfo], list[dict[str, str]], tuple[int, int] | None, list[RouterInfo]]:
        registry = self.registry
        return registry.workers(), registry.timings_since(self.window_s), registry.pin(), registry.routers()

    def _act(self, decision: Decision) -> None:
        for move in decision.moves:
            if move.worker_id in self._moving or move.worker_id not in self.pool.specs:
                continue
            task = asyncio.create_task(self._move(move.worker_id, _ROLES[move.to_role]), name=f"move-{move.worker_id}")
            self._moving[move.worker_id] = task
            self._joining[move.worker_id] = move.to_role
        if decision.add or decision.remove:
            log.warning("controller: %s needs a worker budget, which is not configured; not acting",
                        decision.action.value)

    async def _move(self, worker_id: str, role: Role) -> None:
        try:
            await self.pool.move(worker_id, role)
        except (ray.exceptions.RayError, TimeoutError, OSError):  # logged; the controller goes on with what is left
            log.exception("controller: moving %s to %s failed", worker_id, role.value)
        finally:
            self._moving.pop(worker_id, None)
            self._joining.pop(worker_id, None)

    async def close(self) -> None:
        for task in self._moving.values():
            task.cancel()
        await asyncio.gather(*self._moving.values(), return_exceptions=True)


def _worker(w: WorkerInfo, joining: PoolRole | None) -> WorkerObservation:
    """`joining`: the pool it is being moved to (None: not being moved). A worker still starting will serve the
    pool it registered in; one draining for any other reason (`pdserve drain`) is leaving, for no known pool."""
    moving = joining is not None
    if not moving and w.state is WorkerState.STARTING:
        joining = _POOL_ROLES[w.role]
    return WorkerObservation(worker_id=w.worker_id, role=_POOL_ROLES[w.role],
                             draining=moving or w.state is not WorkerState.READY, joining=joining,
                             running=w.running,
                             waiting=w.waiting, queued_prefill_tokens=w.queued_prefill_tokens,
                             kv_blocks_used=w.kv_blocks_used, kv_blocks_total=w.kv_blocks_total)

