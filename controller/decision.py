"""What one tick decides: hold, move one worker to the other pool, add a worker, or remove one, with the reason.

A `Decision` is what the adapter acts on and what it appends to the Redis stream that `pdserve status` reads, so it
round-trips through strict JSON: non-finite numbers are written as the strings "nan", "inf" and "-inf".
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field

from pdserve.controller.config import ControllerState
from pdserve.controller.observation import PoolRole


class Action(enum.Enum):
    HOLD = "hold"
    MOVE = "move"
    """Drain one worker and restart it in the other pool."""
    ADD = "add"
    """Start one new worker."""
    REMOVE = "remove"
    """Drain one worker and stop it."""


@dataclass(frozen=True)
class Move:
    """Drain `worker_id`, then restart it serving `to_role`."""

    worker_id: str
    to_role: PoolRole


@dataclass(frozen=True)
class Decision:
    """One tick's outcome. At most one of `moves`, `add`, `remove` is non-empty, with at most one entry."""

    now_s: float
    action: Action
    current: tuple[int, int]
    """(prefill, decode) workers now, not counting those in transition."""
    target: tuple[int, int]
    """(prefill, decode) the controller is heading for."""
    moves: tuple[Move, ...] = ()
    add: tuple[PoolRole, ...] = ()
    remove: tuple[str, ...] = ()
    reason: str = ""
    """One readable sentence with the numbers."""
    inputs: dict[str, float] = field(default_factory=dict)
    """Every number the decision used (rate, lengths, corrections, needs, loads, queue terms, ...)."""
    state: ControllerState = ControllerState()
    """Pass this to the next tick."""

    def to_json(self) -> str:
        state = self.state
        return json.dumps({
            "now_s": _num(self.now_s),
            "action": self.action.value,
            "current": list(self.current),
            "target": list(self.target),
            "moves": [{"worker_id": m.worker_id, "to_role": m.to_role.value} for m in self.moves],
            "add": [role.value for role in self.add],
            "remove": list(self.remove),
            "reason": self.reason,
            "inputs": {key: _num(value) for key, value in self.inputs.items()},
            "state": {
                "last_move_s": _num(state.last_move_s),
                "candidate": None if state.candidate is None else list(state.candidate),
                "candidate_ticks": state.candidate_ticks,
                "ttft_correction": _num(state.ttft_correction),
                "tpot_correction": _num(state.tpot_correction),
                "backlog_seen_s": _num(state.backlog_seen_s),
                "traffic_since_s": _num(state.traffic_since_s),
                "output_by_class": [_num(v) for v in state.output_by_class],
                "fitted_input_tokens": _num(state.fitted_input_tokens),
                "rate_samples": [[_num(t), _num(rate)] for t, rate in state.rate_samples],
                "pool_samples": [[_num(t), prefill, decode] for t, prefill, decode in state.pool_samples],
                "add_issued_s": _num(state.add_issued_s),
                "add_from_workers": state.add_from_workers,
                "start_s": _num(state.start_s),
            },
        }, allow_nan=False)

    @staticmethod
    def from_json(text: str | bytes) -> Decision:
        values = json.loads(text)
        state = values["state"]
        return Decision(
            now_s=float(values["now_s"]),
            action=Action(values["action"]),
            current=_pair(values["current"]),
            target=_pair(values["target"]),
            moves=tuple(Move(m["worker_id"], PoolRole(m["to_role"])) for m in values["moves"]),
            add=tuple(PoolRole(role) for role in values["add"]),
            remove=tuple(values["remove"]),
            reason=values["reason"],
            inputs={key: float(value) for key, value in values["inputs"].items()},
            state=ControllerState(
                last_move_s=float(state["last_move_s"]),
                candidate=None if state["candidate"] is None else _pair(state["candidate"]),
                candidate_ticks=int(state["candidate_ticks"]),
                ttft_correction=float(state["ttft_correction"]),
                tpot_correction=float(state["tpot_correction"]),
                backlog_seen_s=float(state.get("backlog_seen_s", "-inf")),
                traffic_since_s=float(state.get("traffic_since_s", "inf")),
                output_by_class=tuple(float(v) for v in state.get("output_by_class", ())),
                fitted_input_tokens=float(state.get("fitted_input_tokens", 0.0)),
                rate_samples=tuple((float(t), float(rate)) for t, rate in state.get("rate_samples", ())),
                pool_samples=tuple((float(t), int(p), int(d)) for t, p, d in state.get("pool_samples", ())),
                add_issued_s=float(state.get("add_issued_s", "-inf")),
                add_from_workers=int(state.get("add_from_workers", 0)),
                start_s=float(state.get("start_s", 0.0)),
            ),
        )


def _num(value: float) -> float | str:
    """A float for strict JSON: non-finite values become the strings float() reads back."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _pair(values: list[int]) -> tuple[int, int]:
    first, second = values
    return int(first), int(second)
