"""The prefill:decode ratio controller: a pure `tick(config, model, state, observation) -> Decision`.

Adapters (reading Redis, moving Ray actors, the simulator) build the `Observation` and act on the `Decision`; the
math is written out in `controller.py` and the modules it names.
"""

from pdserve.controller.config import ControllerConfig, ControllerConfigError, ControllerState
from pdserve.controller.controller import tick
from pdserve.controller.decision import Action, Decision, Move
from pdserve.controller.demand import PoolNeeds, estimate_needs, update_corrections
from pdserve.controller.observation import Observation, PoolRole, TrafficWindow, WorkerObservation
from pdserve.controller.perf_model import PerfModel

__all__ = [
    "Action", "ControllerConfig", "ControllerConfigError", "ControllerState", "Decision", "Move", "Observation",
    "PerfModel", "PoolNeeds", "PoolRole", "TrafficWindow", "WorkerObservation", "estimate_needs", "tick",
    "update_corrections",
]
