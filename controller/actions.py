"""A target split turned into a decision: which pools the added workers join, and which workers are removed or
moved (the least loaded of the pool that shrinks). The controller decides where to head; this names the workers."""

from __future__ import annotations

from pdserve.controller.config import ControllerConfig, ControllerState
from pdserve.controller.decision import Action, Decision, Move
from pdserve.controller.demand import PoolNeeds
from pdserve.controller.observation import Observation, PoolRole, WorkerObservation
from pdserve.controller.split import evaluate


def added_roles(grow_p: int, grow_d: int, count: int, prefill_busier: bool) -> tuple[PoolRole, ...]:
    """The pools `count` new workers join: as many as each pool grows toward the target (a pool the target shrinks
    gives its place to the other: that worker moves later); a tie goes to the busier pool."""
    prefill = min(max(grow_p, 0), count)
    decode = min(max(grow_d, 0), count - prefill)
    while prefill + decode < count:
        if prefill_busier or grow_d <= 0:
            prefill += 1
        else:
            decode += 1
    return (PoolRole.PREFILL,) * prefill + (PoolRole.DECODE,) * decode


def act(config: ControllerConfig, action: Action, target: tuple[int, int], current: tuple[int, int],
        obs: Observation, needs: PoolNeeds | None, why: str, state: ControllerState,
        inputs: dict[str, float], max_moves: int | None = None) -> Decision:
    """The step from current toward target: every worker added or removed at once, or up to `max_moves`
    (config.max_moves) moved."""
    grow_p, grow_d = target[0] - current[0], target[1] - current[1]
    if action is Action.ADD:
        loads = evaluate(needs.prefill, needs.decode, current) if needs is not None else None
        prefill_busier = loads is not None and loads.prefill_load >= loads.decode_load
        roles = added_roles(grow_p, grow_d, target[0] + target[1] - sum(current), prefill_busier)
        named = ", ".join(f"{roles.count(r)} {r.value}" for r in PoolRole if r in roles)
        return Decision(obs.now_s, action, current, target, add=roles,
                        reason=f"{why}; starting {named} worker{'s' if len(roles) > 1 else ''}.", inputs=inputs,
                        state=state)
    if action is Action.REMOVE:
        return removal(target, current, obs, why, state, inputs)
    source = PoolRole.DECODE if grow_p > 0 else PoolRole.PREFILL
    chosen = least_loaded(obs, source)[:max(1, min(max_moves or config.max_moves, abs(grow_p)))]
    names = ", ".join(f"{w.worker_id} (holding {w.load})" for w in chosen)
    return Decision(obs.now_s, action, current, target, moves=tuple(Move(w.worker_id, source.other) for w in chosen),
                    reason=f"{why}; moving {source.value} worker{'s' if len(chosen) > 1 else ''} {names} "
                           f"to {source.other.value}.", inputs=inputs, state=state)


def removal(target: tuple[int, int], current: tuple[int, int], obs: Observation, why: str, state: ControllerState,
            inputs: dict[str, float]) -> Decision:
    """Remove sum(current) - sum(target) workers, the least loaded of the pools that shrink (prefill first as far
    as it shrinks, the rest from decode)."""
    count = sum(current) - sum(target)
    shrink_p = current[0] - target[0]
    from_prefill = min(max(0, shrink_p), count)
    chosen = []
    for role, n in ((PoolRole.PREFILL, from_prefill), (PoolRole.DECODE, count - from_prefill)):
        chosen += least_loaded(obs, role)[:n]
    names = ", ".join(f"{w.role.value} worker {w.worker_id} (holding {w.load})" for w in chosen)
    return Decision(obs.now_s, Action.REMOVE, current, target, remove=tuple(w.worker_id for w in chosen),
                    reason=f"{why}; removing {names}.", inputs=inputs, state=state)


def least_loaded(obs: Observation, role: PoolRole) -> list[WorkerObservation]:
    """The pool's active workers, least loaded first (fewest running + waiting, then worker id)."""
    return sorted(obs.active(role), key=lambda w: (w.load, w.worker_id))
