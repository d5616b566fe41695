"""What the ratio controller sees on one tick: every worker's load, and the traffic of the last window.

An adapter builds an `Observation` from Redis (the registry's heartbeats and the router's timings stream), or the
simulator builds one from its own state; `controller.tick` never reads anything else. Only plain numbers and enums
live here, so an observation can be logged, replayed, and made up in a test.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class PoolRole(enum.Enum):
    """The pool a worker serves. Controller-local: the controller does not import the cluster package."""

    PREFILL = "prefill"
    DECODE = "decode"

    @property
    def other(self) -> PoolRole:
        return PoolRole.DECODE if self is PoolRole.PREFILL else PoolRole.PREFILL


@dataclass(frozen=True)
class WorkerObservation:
    """One worker's heartbeat, as the controller needs it."""

    worker_id: str
    role: PoolRole
    """The pool it serves, or, while it restarts after a move, the pool it is joining."""
    draining: bool
    """In transition: draining before a move or a remove, restarting in its new role, or starting after an add. A
    worker in transition counts in neither pool, and while any worker is in transition, other than one `leaving`, the
    controller holds (unless a shift in the mix sends more workers the way they are going: `joining`)."""
    joining: PoolRole | None = None
    """While in transition, the pool it will serve once ready (None: not in transition, or not known)."""
    leaving: bool = False
    """Draining to be removed: it takes no new requests and will not serve again, so the controller does not wait
    for it (it still holds its machine until it is gone). Added in policy API version 1 with a default."""
    running: int = 0
    """Requests decoding on it (decode) or being prefilled / held for KV pickup (prefill)."""
    waiting: int = 0
    """Requests queued on it and not yet running."""
    queued_prefill_tokens: int = 0
    """Prompt tokens queued on it and not yet prefilled (prefill workers)."""
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0

    @property
    def load(self) -> int:
        """How many requests it holds: what 'least loaded' compares."""
        return self.running + self.waiting


@dataclass(frozen=True)
class TrafficWindow:
    """The requests of the last `window_s` seconds. Latencies are NaN when the window finished nothing."""

    window_s: float
    arrival_rate: float
    """Requests per second that arrived in the window."""
    finished: int
    """Requests that finished in the window (the latency and length figures come from these)."""
    mean_input_tokens: float
    mean_output_tokens: float
    ttft_p50_s: float
    ttft_p90_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    attainment: float
    """Share of the finished requests that met both SLOs (NaN when none finished)."""
    router_waiting: int = 0
    """Requests the router accepted and has not yet sent to a prefill worker."""
    arrived_input_tokens: float = math.nan
    """Mean prompt length of the requests that arrived in the window (NaN when unknown). The router knows a
    prompt's length the moment it arrives, so this follows a change in the mix at once, while the finished
    requests' lengths lag it by a request's lifetime."""
    arrived_by_class: tuple[int, ...] = ()
    """The window's arrivals per prompt-length class (`output_lengths.prompt_class`); empty when unknown."""
    finished_by_class: tuple[tuple[int, float], ...] = ()
    """(count, mean output tokens) of the window's finished requests per prompt-length class."""

    @property
    def idle(self) -> bool:
        """Nothing arrived and nothing finished: there is no traffic to size the pools for."""
        return self.finished == 0 and self.arrival_rate == 0

    @property
    def has_lengths(self) -> bool:
        """The mean input and output lengths are known (some request finished in the window)."""
        return math.isfinite(self.mean_input_tokens) and math.isfinite(self.mean_output_tokens) and \
            self.mean_input_tokens > 0


@dataclass(frozen=True)
class Observation:
    """Everything one tick decides from."""

    now_s: float
    workers: tuple[WorkerObservation, ...]
    traffic: TrafficWindow
    pin: tuple[int, int] | None = None
    """The operator's pin (`pdserve ratio --pin`): the (prefill, decode) split to hold whatever the traffic; None
    when unpinned."""

    def active(self, role: PoolRole) -> tuple[WorkerObservation, ...]:
        """The pool's workers that are not in transition, in worker id order."""
        return tuple(sorted((w for w in self.workers if w.role is role and not w.draining),
                            key=lambda w: w.worker_id))

    @property
    def sizes(self) -> tuple[int, int]:
        """(prefill, decode): the workers in each pool, not counting those in transition."""
        return len(self.active(PoolRole.PREFILL)), len(self.active(PoolRole.DECODE))

    @property
    def draining(self) -> tuple[WorkerObservation, ...]:
        return tuple(w for w in self.workers if w.draining)

    @property
    def settling(self) -> tuple[WorkerObservation, ...]:
        """The workers in transition that will serve again (starting, or moving between the pools): what the
        controller waits for before its next change. A worker leaving is not one."""
        return tuple(w for w in self.workers if w.draining and not w.leaving)

    @property
    def heading(self) -> tuple[int, int] | None:
        """(prefill, decode) once every worker settling has joined its pool; None if any has no known pool."""
        if any(w.joining is None for w in self.settling):
            return None
        prefill, decode = self.sizes
        joining_prefill = sum(w.joining is PoolRole.PREFILL for w in self.settling)
        return prefill + joining_prefill, decode + len(self.settling) - joining_prefill
