"""Policies: what decides, each tick, how many workers serve and in which pool. The built-in ratio controller is one
(`RatioPolicy`); any class of the same shape is another, named in the config as "package.module:Class".

The interface, version 1 (`POLICY_API_VERSION`):

    class QueueScaler:
        api_version = 1                                   # optional; a policy written for another version is refused
        def __init__(self, context: PolicyContext, settings: Mapping[str, Any]) -> None: ...
        def tick(self, observation: Observation) -> Decision: ...

- `context.config` (`ControllerConfig`) holds what the cluster fixes: the SLOs, the tick interval, the worker budget
  (`min_workers`, `max_workers`) and the per-pool bounds (`min_prefill`, `max_prefill`, `min_decode`, `max_decode`),
  a decode worker's KV capacity; and the built-in policy's own knobs, which another policy may ignore.
  `context.model` (`PerfModel`) predicts a worker's prefill and decode step times.
- `settings` is the policy's own section: `controller.policy_config` in the YAML, `--policy-config` (JSON) in
  `pdserve plan`. A policy refuses a setting it does not know with `ControllerConfigError` naming it.
- `Observation` (`controller/observation.py`) is every worker's load and the last window's traffic; `Decision`
  (`controller/decision.py`) is HOLD, or one MOVE (up to max_moves workers to the other pool), ADD (one worker to a
  pool) or REMOVE (one worker, by id), with a one-sentence reason. Within a version, fields are only ever added, with
  defaults, so a policy written against version 1 keeps working.

The adapters (`control_plane/controller_loop.py` live, `bench/simulator.py` in `pdserve plan`) call `tick` every
`interval_s`, record each decision with its reason, and act on it; what breaks the budget or names a worker that is
not active is refused (`refusal`), logged, and not acted on, so a policy cannot shrink the fleet below its floor.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pdserve.controller.config import ControllerConfig, ControllerConfigError, ControllerState
from pdserve.controller.controller import tick
from pdserve.controller.decision import Action, Decision
from pdserve.controller.observation import Observation, PoolRole
from pdserve.controller.perf_model import PerfModel

log = logging.getLogger(__name__)

POLICY_API_VERSION = 1
BUILT_IN = "ratio"
"""The name of the built-in ratio controller (also what an empty `controller.policy` means)."""


@dataclass(frozen=True)
class PolicyContext:
    """What the cluster tells a policy when it is made."""

    config: ControllerConfig
    model: PerfModel


class Policy(Protocol):
    def tick(self, observation: Observation) -> Decision:
        """This tick's decision; the policy keeps whatever state it needs between ticks."""
        ...


class RatioPolicy:
    """The built-in ratio controller (`controller.tick`) as a policy: its settings are the controller section's."""

    api_version = POLICY_API_VERSION

    def __init__(self, context: PolicyContext, settings: Mapping[str, Any]) -> None:
        if settings:
            raise ControllerConfigError(f"policy_config: the built-in ratio policy takes its settings from the "
                                        f"controller section itself, got {sorted(settings)}")
        self.config = context.config
        self.model = context.model
        self.state = ControllerState()

    def tick(self, observation: Observation) -> Decision:
        config = self.config
        if observation.pin is not None:
            try:
                config = self.config.replace(pin=observation.pin)
            except ControllerConfigError as e:  # an operator's pin outside the bounds: not followed (and the
                log.warning("controller: the pin is not followed: %s", e)  # controller goes on, unpinned)
        decision = tick(config, self.model, self.state, observation)
        self.state = decision.state
        return decision


def load_policy(name: str, context: PolicyContext, settings: Mapping[str, Any] | None = None) -> Policy:
    """The policy `name` names ("" or "ratio": the built-in; else "package.module:Class"), made with `context`
    and its `settings`. Raises `ControllerConfigError` naming `policy` when it cannot be found or made."""
    return policy_class(name)(context, dict(settings or {}))


def policy_class(name: str) -> type:
    """The class `name` names, checked (its API version, a tick method); `ControllerConfigError` naming `policy`
    when it cannot be found. Cheap: the control plane checks the name before it has what a policy is made with."""
    if name in ("", BUILT_IN):
        return RatioPolicy
    module_name, _, class_name = name.partition(":")
    if not module_name or not class_name:
        raise ControllerConfigError(f"policy: expected 'package.module:Class' (or '{BUILT_IN}'), got {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ControllerConfigError(f"policy: cannot import {module_name!r}: {e}") from e
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ControllerConfigError(f"policy: module {module_name!r} has no {class_name!r}")
    version = getattr(cls, "api_version", POLICY_API_VERSION)
    if version != POLICY_API_VERSION:
        raise ControllerConfigError(f"policy: {name} is written for policy API version {version}; this pdserve "
                                    f"speaks version {POLICY_API_VERSION}")
    if not callable(getattr(cls, "tick", None)):
        raise ControllerConfigError(f"policy: {name} has no tick(observation) method")
    return cls


def refusal(decision: Decision, observation: Observation, config: ControllerConfig) -> str:
    """Why the adapter must not act on `decision` ("" when it may): an add past the budget or a pool's bound, a
    remove below them, or a worker that is not active in the pool it is moved or removed from."""
    workers = len(observation.workers)  # those in transition count: they will serve, or still hold a machine
    staying = sum(not w.leaving for w in observation.workers)  # a worker already leaving cannot be removed again
    sizes = dict(zip(PoolRole, observation.sizes))
    active = {w.worker_id: w.role for w in observation.workers if not w.draining}
    if sum(bool(part) for part in (decision.moves, decision.add, decision.remove)) > 1:
        return "a decision may move, add or remove, not more than one of them"
    if decision.add:
        if config.max_workers is None or workers + len(decision.add) > config.max_workers:
            return f"adding {len(decision.add)} to {workers} workers exceeds max_workers ({config.max_workers})"
        for role in set(decision.add):
            high = config.max_prefill if role is PoolRole.PREFILL else config.max_decode
            if high is not None and sizes[role] + decision.add.count(role) > high:
                return f"adding a {role.value} worker exceeds max_{role.value} ({high})"
    if decision.remove:
        if config.min_workers is None or staying - len(decision.remove) < config.min_workers:
            return (f"removing {len(decision.remove)} of {staying} workers (not counting those already leaving) goes "
                    f"below min_workers ({config.min_workers})")
    leaving = [(m.worker_id, active.get(m.worker_id), m.to_role) for m in decision.moves]
    leaving += [(worker_id, active.get(worker_id), None) for worker_id in decision.remove]
    for worker_id, role, _ in leaving:
        if role is None:
            return f"{worker_id} is not an active worker"
    for role in PoolRole:
        left = sizes[role] - sum(1 for _, r, _ in leaving if r is role)
        low = config.min_prefill if role is PoolRole.PREFILL else config.min_decode
        if left < low and any(r is role for _, r, _ in leaving):
            return f"it leaves {left} {role.value} workers, below min_{role.value} ({low})"
    return ""


def within_budget(decision: Decision, observation: Observation, config: ControllerConfig) -> Decision:
    """`decision` if the adapter may act on it; else a HOLD whose reason says why it was refused."""
    why_not = refusal(decision, observation, config)
    if not why_not:
        return decision
    return dataclasses.replace(decision, action=Action.HOLD, moves=(), add=(), remove=(),
                               reason=f"Refused: {why_not} ({decision.reason})")
