"""An example scaling policy: add a worker when requests queue, remove one when the queues stay empty.

    controller:
      enabled: true
      policy: pdserve.examples.queue_scaler:QueueScaler
      policy_config: {add_above: 4, quiet_ticks: 6}
      min_workers: 2
      max_workers: 8

    pdserve plan --trace t.jsonl --workers 4 --policy pdserve.examples.queue_scaler:QueueScaler \\
        --policy-config '{"add_above": 4}' --min-workers 2 --max-workers 8

It knows nothing of the model or the SLOs: each tick it counts the requests waiting per worker in each pool (prefill:
those queued on prefill workers; decode: those queued on decode workers plus those waiting at the routers, which
wait for a decode worker with room for their KV). Above
`add_above` in a pool, it adds a worker there; once both pools have had no more than `remove_at` waiting for
`quiet_ticks` ticks in a row, it removes the least loaded worker of the larger pool. While a worker is starting or
draining it holds. The adapter keeps it within the budget (`min_workers`, `max_workers`, the per-pool bounds).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pdserve.controller.config import ControllerConfigError
from pdserve.controller.decision import Action, Decision
from pdserve.controller.observation import Observation, PoolRole
from pdserve.controller.policy import POLICY_API_VERSION, PolicyContext

DEFAULTS = {"add_above": 4.0, "remove_at": 0.0, "quiet_ticks": 6}


class QueueScaler:
    api_version = POLICY_API_VERSION

    def __init__(self, context: PolicyContext, settings: Mapping[str, Any]) -> None:
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise ControllerConfigError(f"policy_config: unknown setting(s) {sorted(unknown)} "
                                        f"(known: {sorted(DEFAULTS)})")
        values = {**DEFAULTS, **settings}
        self.add_above = float(values["add_above"])
        self.remove_at = float(values["remove_at"])
        self.quiet_ticks = int(values["quiet_ticks"])
        self.config = context.config
        self.quiet = 0

    def tick(self, observation: Observation) -> Decision:
        sizes = observation.sizes
        queued = self._queued_per_worker(observation)

        def decide(action: Action, why: str, **change: tuple) -> Decision:
            return Decision(observation.now_s, action, sizes, sizes, reason=why, **change)

        if observation.draining:
            return decide(Action.HOLD, f"Hold at {sizes}: a worker is starting or leaving.")
        busiest = max(PoolRole, key=lambda role: queued[role])
        budget = self.config.max_workers or 0
        if queued[busiest] > self.add_above and sum(sizes) < budget:
            self.quiet = 0
            return decide(Action.ADD, f"{queued[busiest]:.1f} requests wait per {busiest.value} worker "
                                      f"(> {self.add_above:g}): adding one.", add=(busiest,))
        self.quiet = self.quiet + 1 if max(queued.values()) <= self.remove_at else 0
        floor = self.config.min_workers or sum(sizes)
        if self.quiet >= self.quiet_ticks and sum(sizes) > floor:
            self.quiet = 0
            role = PoolRole.PREFILL if sizes[0] > sizes[1] else PoolRole.DECODE
            worker = min(observation.active(role), key=lambda w: (w.load, w.worker_id))
            return decide(Action.REMOVE, f"No queue for {self.quiet_ticks} ticks: removing {role.value} worker "
                                         f"{worker.worker_id} (holding {worker.load}).", remove=(worker.worker_id,))
        return decide(Action.HOLD, f"Hold at {sizes}: {queued[PoolRole.PREFILL]:.1f} prefill and "
                                   f"{queued[PoolRole.DECODE]:.1f} decode requests waiting per worker.")

    @staticmethod
    def _queued_per_worker(observation: Observation) -> dict[PoolRole, float]:
        queued = {}
        for role in PoolRole:
            workers = observation.active(role)
            waiting = sum(w.waiting for w in workers)
            if role is PoolRole.DECODE:
                waiting += observation.traffic.router_waiting
            queued[role] = waiting / max(len(workers), 1)
        return queued
