"""The ratio controller on a live cluster: the adapter around a policy (`controller.policy`: the built-in ratio
controller, the pure `controller.tick`, or a plug-in of the same shape).

Every `interval_s` (in the control plane's event loop):

    observe: the workers from the registry (a worker draining, or being moved, counts as in transition; one being
             removed as leaving), the last
             `window_s` of the Redis timings stream (what finished: lengths, TTFT/TPOT percentiles, attainment), the
             arrival rate and the arrivals' mean prompt length over the same window (from every router's counters
             in the registry, sampled each tick and taken per router, so a router that starts again from zero
             counts right) and the requests waiting at the routers
             and the operator's pin (Redis, or the config)
    -> policy.tick(observation) -> Decision; one that breaks the budget is refused (`policy.within_budget`): recorded as
       a HOLD saying why, and not acted on
    -> record: the decision as JSON on the `decisions` stream (`pdserve status` shows the last ones) and in the log
    -> act (unless dry run), each in the background, the policy seeing the worker in transition meanwhile:
       MOVE   drains the worker and makes it serve the other role (`WorkerPool.move`);
       ADD    starts workers in the pools named (`Scaler.plan_adds`, `start_added`): on this machine's Ray, refused
              at once if there is no room; on a Ray cluster, Ray (and its autoscaler) has `add_timeout_s` to place
              and start it, or it is killed;
       REMOVE drains the worker (its requests finish or are handed on) and stops it (`Scaler.remove`).
       An add or remove that fails is recorded on the stream as a HOLD naming the worker and the reason.
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

from pdserve.control_plane.scaler import ScaleError, Scaler
from pdserve.control_plane.worker_pool import WorkerPool
from pdserve.controller.config import ControllerConfig
from pdserve.controller.decision import Action, Decision
from pdserve.controller.observation import Observation, PoolRole, WorkerObservation
from pdserve.controller.policy import Policy, within_budget
from pdserve.controller.window import finished_requests, traffic_window
from pdserve.registry.entries import Role, RouterInfo, WorkerInfo, WorkerState
from pdserve.registry.registry import Registry
from pdserve.worker.runtime import WorkerSpec

log = logging.getLogger(__name__)

_POOL_ROLES = {Role.PREFILL: PoolRole.PREFILL, Role.DECODE: PoolRole.DECODE}
_ROLES = {PoolRole.PREFILL: Role.PREFILL, PoolRole.DECODE: Role.DECODE}


class ControllerLoop:
    def __init__(self, config: ControllerConfig, policy: Policy, registry: Registry, scaler: Scaler,
                 window_s: float, dry_run: bool, add_timeout_s: float = 600.0) -> None:
        """`config`: the SLOs, the tick interval and the budget the policy is kept within."""
        self.config = config
        self.policy = policy
        self.registry = registry
        self.scaler = scaler
        self.pool: WorkerPool = scaler.pool
        self.window_s = window_s
        self.dry_run = dry_run
        self.add_timeout_s = add_timeout_s
        self._moving: dict[str, asyncio.Task] = {}
        """Workers being moved or removed, by id."""
        self._joining: dict[str, PoolRole] = {}
        """The pool each worker being moved will serve."""
        self._adding: dict[str, tuple[PoolRole, asyncio.Task]] = {}
        """Workers being added, by their new id: the pool each will serve."""
        self._last: Observation | None = None
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
        observation = dataclasses.replace(self.observe(workers, timings, routers), pin=pin or self.config.pin)
        self._last = observation
        decision = within_budget(self.policy.tick(observation), observation, self.config)
        await self._record(decision)
        if not self.dry_run:
            await self._act(decision)
        return decision

    async def _record(self, decision: Decision) -> None:
        await asyncio.to_thread(self.registry.append_decision, decision.to_json(), self.dry_run)
        level = logging.INFO if decision.action is Action.HOLD else logging.WARNING
        log.log(level, "controller%s: %s", " (dry run)" if self.dry_run else "", decision.reason)

    def observe(self, workers: list[WorkerInfo], timings: list[dict[str, str]],
                routers: list[RouterInfo]) -> Observation:
        now = time.monotonic()
        leaving = {worker_id for worker_id in self._moving if worker_id not in self._joining}  # being removed
        seen = [_worker(w, self._joining.get(w.worker_id), w.worker_id in leaving)
                for w in workers if w.role in _POOL_ROLES]
        present = {w.worker_id for w in seen}
        # a worker being moved is gone from the registry while it restarts: still count it, in transition, joining
        # no known pool (its successor registers under a new id, which would count it twice in `heading`); one
        # being removed is gone from the registry while it stops, and still holds its machine
        seen += [WorkerObservation(worker_id, _POOL_ROLES[self.pool.specs[worker_id].role], draining=True,
                                   leaving=worker_id in leaving)
                 for worker_id in self._moving if worker_id not in present and worker_id in self.pool.specs]
        # a worker being added is in transition, joining its pool, before it registers (Ray placing it)
        seen += [WorkerObservation(worker_id, role, draining=True, joining=role)
                 for worker_id, (role, _) in self._adding.items() if worker_id not in present]
        # so is one the control plane's watch or an operator started (it registers once its engine is loaded):
        # uncounted, the policy could add past max_workers for a slot already being filled (not while a move is
        # under way: a moved worker's successor is already counted as the moving worker)
        known = present | set(self._adding)
        seen += [WorkerObservation(worker_id, _POOL_ROLES[spec.role], draining=True, joining=_POOL_ROLES[spec.role])
                 for worker_id, spec in self.pool.specs.items()
                 if not self._moving and worker_id not in known and spec.role in _POOL_ROLES]
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

    async def _act(self, decision: Decision) -> None:
        for move in decision.moves:
            if move.worker_id in self._moving or move.worker_id not in self.pool.specs:
                continue
            task = asyncio.create_task(self._move(move.worker_id, _ROLES[move.to_role]), name=f"move-{move.worker_id}")
            self._moving[move.worker_id] = task
            self._joining[move.worker_id] = move.to_role
        for worker_id in decision.remove:
            if worker_id not in self._moving and worker_id in self.pool.specs:
                self._moving[worker_id] = asyncio.create_task(self._remove(worker_id), name=f"remove-{worker_id}")
        if not decision.add:
            return
        try:
            specs = self.scaler.plan_adds([_ROLES[role] for role in decision.add])
        except ScaleError as e:
            await self._failed(f"Adding {len(decision.add)} worker(s) failed: {e}")
            return
        for role, spec in zip(decision.add, specs):
            task = asyncio.create_task(self._add(spec.worker_id, spec), name=f"add-{spec.worker_id}")
            self._adding[spec.worker_id] = (role, task)

    async def _add(self, worker_id: str, spec: WorkerSpec) -> None:
        try:
            await self.scaler.start_added(spec, self.add_timeout_s)
        except ScaleError as e:
            await self._failed(f"Adding {worker_id} failed: {e}")
        finally:
            self._adding.pop(worker_id, None)

    async def _remove(self, worker_id: str) -> None:
        try:
            await self.scaler.remove(worker_id)
        except (ScaleError, ray.exceptions.RayError, OSError) as e:
            await self._failed(f"Removing {worker_id} failed: {e}")
        finally:
            self._moving.pop(worker_id, None)

    async def _failed(self, why: str) -> None:
        """An add or remove that did not happen: in the log and on the decisions stream, as a HOLD saying why."""
        last = self._last
        now = last.now_s if last is not None else time.monotonic() - self._started
        sizes = last.sizes if last is not None else (0, 0)
        try:
            await self._record(Decision(now, Action.HOLD, sizes, sizes, reason=why))
        except redis.RedisError as e:
            log.error("controller: %s (not recorded: Redis: %s)", why, e)

    async def _move(self, worker_id: str, role: Role) -> None:
        try:
            await self.pool.move(worker_id, role)
        except (ray.exceptions.RayError, TimeoutError, OSError):  # logged; the controller goes on with what is left
            log.exception("controller: moving %s to %s failed", worker_id, role.value)
        finally:
            self._moving.pop(worker_id, None)
            self._joining.pop(worker_id, None)

    async def close(self) -> None:
        tasks = [*self._moving.values(), *(task for _, task in self._adding.values())]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _worker(w: WorkerInfo, joining: PoolRole | None, leaving: bool) -> WorkerObservation:
    """`joining`: the pool it is being moved to (None: not being moved); `leaving`: the controller is removing it.
    A worker still starting will serve the pool it registered in; one draining for any other reason (`pdserve
    drain`) is in transition for no known pool, and waited for: it may come back."""
    moving = joining is not None
    if not moving and w.state is WorkerState.STARTING:
        joining = _POOL_ROLES[w.role]
    return WorkerObservation(worker_id=w.worker_id, role=_POOL_ROLES[w.role],
                             draining=moving or leaving or w.state is not WorkerState.READY, joining=joining,
                             leaving=leaving,
                             running=w.running,
                             waiting=w.waiting, queued_prefill_tokens=w.queued_prefill_tokens,
                             kv_blocks_used=w.kv_blocks_used, kv_blocks_total=w.kv_blocks_total)

