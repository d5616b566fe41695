"""Which router owns each request on a decode worker: its lease, its outbox, and every request's journal.

    add(request, owner)            a router reserved (or sent) a request here: it owns it, and its lease starts
    record(events)                 every event goes to its request's journal and to its owner's outbox
    take(router, timeout, done)    the router collects its outbox; the call renews its lease on all its requests,
                                   and drops the journals of the requests it names as done
    adopt(client id, router, n, d) a client reconnected to another router: that router owns the request (of the
                                   prompt with digest d) from now on and gets the journal's events past the n
                                   tokens the client has
    expired()                      requests of routers that have not collected for `lease_s`: the worker aborts
                                   them and frees their blocks (a killed or hung router leaks nothing)

Positions: the engine counts a request's tokens from its attempt's start; `record` adds the owner's position (the
tokens its client had when the attempt began), so every event says where it sits in the client's output. The
journal keeps every event of a request, so a request that outlives its router can be taken over where its client
left off. Everything here runs on the worker's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pdserve.engine.request import FinishReason
from pdserve.worker.messages import Adoption, Owner, TokenEvent

log = logging.getLogger(__name__)


@dataclass
class _Owned:
    owner: Owner
    prefill_worker: str
    journal: list[TokenEvent] = field(default_factory=list)

    @property
    def end(self) -> int:
        """The position after the last token produced so far."""
        return max((e.end for e in self.journal if e.token_ids), default=self.owner.position)


@dataclass
class _Outbox:
    """One router's events waiting to be collected, and when it last collected."""

    last_seen: float
    events: list[TokenEvent] = field(default_factory=list)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


class Owners:
    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s = lease_s
        self.clock = clock
        self._owned: dict[str, _Owned] = {}
        self._outboxes: dict[str, _Outbox] = {}

    def add(self, request_id: str, owner: Owner, prefill_worker: str = "") -> None:
        self._owned[request_id] = _Owned(owner, prefill_worker)
        self._outbox(owner.router_id).last_seen = self.clock()  # sending work shows the router is alive

    def owner(self, request_id: str) -> Owner | None:
        owned = self._owned.get(request_id)
        return None if owned is None else owned.owner

    def forget(self, request_id: str) -> None:
        self._owned.pop(request_id, None)

    def record(self, events: Iterable[TokenEvent]) -> None:
        for event in events:
            owned = self._owned.get(event.request_id)
            if owned is None:
                continue  # aborted or reaped: its router does not want it
            event = dataclasses.replace(event, position=owned.owner.position + event.position)
            owned.journal.append(event)
            self._post(owned.owner.router_id, event)

    async def take(self, router_id: str, timeout_s: float, done: Iterable[str] = ()) -> list[TokenEvent]:
        """The router's new events; waits up to `timeout_s` for one. `done`: its requests it wants nothing more of."""
        for request_id in done:
            owner = self.owner(request_id)
            if owner is not None and owner.router_id == router_id:
                self.forget(request_id)
        box = self._outbox(router_id)
        box.last_seen = self.clock()
        if not box.events:
            try:
                await asyncio.wait_for(box.wakeup.wait(), timeout_s)
            except TimeoutError:
                pass
        box.last_seen = self.clock()
        events, box.events = box.events, []
        box.wakeup.clear()
        return events

    def adopt(self, client_request_id: str, router_id: str, client_has: int, prompt_digest: str) -> Adoption | None:
        """Make `router_id` the owner of the request its client knows as `client_request_id`, whose client has
        `client_has` tokens; None when no request here can continue from there (the router then resumes it
        elsewhere, from the tokens the client sent). A request with no event here yet (its KV and first token still
        on their way) is not taken over: how its prefill ends is told to its first router only, so a new owner
        could wait for it forever."""
        found = [(k, o) for k, o in self._owned.items() if o.owner.client_request_id == client_request_id
                 and o.owner.prompt_digest == prompt_digest and o.journal and o.owner.position <= client_has <= o.end]
        if not found:
            return None
        request_id, owned = max(found, key=lambda item: item[1].owner.position)
        previous = owned.owner.router_id
        owned.owner = dataclasses.replace(owned.owner, router_id=router_id)
        self._outbox(router_id).last_seen = self.clock()
        if previous != router_id:
            old = self._outbox(previous)
            old.events = [e for e in old.events if e.request_id != request_id]
            self._post(previous, TokenEvent(request_id, finish_reason=FinishReason.ABORT, adopted_by=router_id))
        log.info("request %s: router %s took it over from %s at token %d", request_id, router_id, previous,
                 client_has)
        replay = [e for e in owned.journal if e.end > client_has or not e.token_ids or e.finish_reason is not None]
        return Adoption(request_id, owned.prefill_worker, tuple(replay))

    def expired(self) -> list[str]:
        """The requests whose router has not collected for `lease_s` (forgotten here; the caller aborts them), and
        those routers' outboxes dropped."""
        cutoff = self.clock() - self.lease_s
        gone = {r for r, box in self._outboxes.items() if box.last_seen < cutoff}
        if not gone:
            return []
        reaped = [k for k, o in self._owned.items() if o.owner.router_id in gone]
        for request_id in reaped:
            self.forget(request_id)
        for router_id in gone:
            del self._outboxes[router_id]
        if reaped:
            log.warning("routers %s have not collected their events for %.0f s: %d of their requests reaped",
                        sorted(gone), self.lease_s, len(reaped))
        return reaped

    def undelivered(self) -> bool:
        """Some router has events here it has not collected."""
        return any(box.events for box in self._outboxes.values())

    def __len__(self) -> int:
        return len(self._owned)

    def _outbox(self, router_id: str) -> _Outbox:
        box = self._outboxes.get(router_id)
        if box is None:
            box = self._outboxes[router_id] = _Outbox(self.clock())
        return box

    def _post(self, router_id: str, event: TokenEvent) -> None:
        box = self._outbox(router_id)
        box.events.append(event)
        box.wakeup.set()
