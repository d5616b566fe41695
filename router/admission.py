"""The router's admission: which request ids run here, how many wait for a worker, and what arrived.

    with admission.admit(request) as ticket:     # DuplicateRequest, Overloaded
        ... ticket.dispatched()                  # it has a worker now (it no longer counts as waiting)
        ... ticket.waiting()                     # it waits again (resumed after a failure)

A request counts as waiting from its admission until it has a worker: choosing one, or waiting for KV room (a
low-priority one also while the `PriorityGate` holds it back). Online and low-priority requests each have
`max_waiting` places: beyond them a new one of its kind is refused at once (low-priority ones held back by the gate
never take an online request's place). The gate hears when online requests start and stop waiting. The arrival
counters are the ratio controller's (every router publishes its own in the registry; the controller sums them).
"""

from __future__ import annotations

from pdserve.controller.output_lengths import NUM_CLASSES, prompt_class
from pdserve.router.errors import DuplicateRequest, Overloaded
from pdserve.router.priority_gate import PriorityGate, is_low_priority
from pdserve.router.request_builder import ValidRequest


class Admission:
    def __init__(self, max_waiting: int = 1024, gate: PriorityGate | None = None) -> None:
        self.max_waiting = max_waiting
        self.gate = gate or PriorityGate(limit=8)
        self.running: set[str] = set()
        """The client request ids accepted and not yet ended (a duplicate is refused)."""
        self.waiting_count = 0
        """Requests waiting for a worker, of any priority."""
        self.low_waiting_count = 0
        """Of those, the low-priority ones."""
        self.accepted_total = 0
        self.accepted_prompt_tokens = 0
        self.accepted_by_class = [0] * NUM_CLASSES

    @property
    def in_flight_count(self) -> int:
        return len(self.running)

    def admit(self, request: ValidRequest) -> Ticket:
        if request.request_id in self.running:
            raise DuplicateRequest(f"request_id: {request.request_id!r} is already running")
        online = not is_low_priority(request.priority)
        waiting = self.waiting_count - self.low_waiting_count if online else self.low_waiting_count
        if waiting >= self.max_waiting:
            kind = "" if online else "low-priority "
            raise Overloaded(f"overloaded: {waiting} {kind}requests are already waiting for a worker "
                             f"(router.max_waiting); retry later")
        self.running.add(request.request_id)
        self.accepted_total += 1
        self.accepted_prompt_tokens += len(request.token_ids)
        self.accepted_by_class[prompt_class(len(request.token_ids))] += 1
        return Ticket(self, request.request_id, online=online)


class Ticket:
    """One admitted request: waiting for a worker, or dispatched to one, until it ends."""

    def __init__(self, admission: Admission, request_id: str, online: bool = True) -> None:
        self._admission = admission
        self.request_id = request_id
        self.online = online
        self._waiting = False
        self.waiting()

    def dispatched(self) -> None:
        if self._waiting:
            self._waiting = False
            self._admission.waiting_count -= 1
            if self.online:
                self._admission.gate.online_wait_ended()
            else:
                self._admission.low_waiting_count -= 1

    def waiting(self) -> None:
        if not self._waiting:
            self._waiting = True
            self._admission.waiting_count += 1
            if self.online:
                self._admission.gate.online_wait_started()
            else:
                self._admission.low_waiting_count += 1

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc) -> None:
        self.dispatched()
        self._admission.running.discard(self.request_id)
