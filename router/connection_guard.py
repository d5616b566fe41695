"""Bounds on the router's HTTP connections, so that a flood of idle or half-open ones cannot take its file
descriptors from the clients it serves.

- A connection must send a whole request head within `header_timeout_s` of opening (or of starting its next
  request on a kept-alive connection), else it is closed. uvicorn itself only times out connections idle between
  two requests.
- At most `per_address` connections from one client address: the next is closed at once.
- At most `total` connections: a new one beyond it takes the place of the oldest connection still waiting for its
  request head (a flood's connections never send one, so they go first); only when every connection has a request
  under way is the new one closed.

    guard = ConnectionGuard(limits)
    uvicorn.Config(app, http=guard.protocol)     # each connection: admit -> waiting / busy -> closed

Refusals and timeouts are counted (`refused`, `timed_out`), and logged at most once a minute each.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class ConnectionLimits:
    total: int = 4096
    per_address: int = 1024
    header_timeout_s: float = 10.0


class ConnectionGuard:
    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._open: set[GuardedProtocol] = set()
        self._per_address: Counter[str] = Counter()
        self._waiting: dict[GuardedProtocol, None] = {}
        """Connections without a request under way, oldest first (a dict keeps insertion order)."""
        self.refused = 0
        self.timed_out = 0
        self._logged_at: dict[str, float] = {}

    def protocol(self, **uvicorn_args) -> GuardedProtocol:
        """uvicorn's protocol factory (`http=`): one guarded connection."""
        return GuardedProtocol(guard=self, **uvicorn_args)

    def open_connections(self) -> int:
        return len(self._open)

    # ---- called by the connections ---------------------------------------------------------------------------
    def admit(self, connection: GuardedProtocol) -> bool:
        """A connection opened: count it, making room if needed; False if it must be closed at once."""
        address = connection.address
        if self._per_address[address] >= self.limits.per_address:
            self._refuse(f"{self.limits.per_address} connections from {address} open")
            return False
        if len(self._open) >= self.limits.total:
            oldest = next(iter(self._waiting), None)
            if oldest is None:
                self._refuse(f"{self.limits.total} connections open, each with a request under way")
                return False
            self._refuse(f"{self.limits.total} connections open: the oldest one without a request was closed")
            oldest.close()
            self.closed(oldest)
        self._open.add(connection)
        self._per_address[address] += 1
        self.waiting(connection)
        return True

    def waiting(self, connection: GuardedProtocol) -> None:
        """`connection` has no request under way (it may be replaced by a new connection)."""
        if connection in self._open:
            self._waiting.setdefault(connection, None)

    def busy(self, connection: GuardedProtocol) -> None:
        self._waiting.pop(connection, None)

    def closed(self, connection: GuardedProtocol) -> None:
        if connection not in self._open:
            return
        self._open.discard(connection)
        self._waiting.pop(connection, None)
        self._per_address[connection.address] -= 1
        if not self._per_address[connection.address]:
            del self._per_address[connection.address]

    def head_overdue(self) -> None:
        self.timed_out += 1
        self._log_sometimes("timeout", "HTTP connection closed: no request head within %.0f s (%d so far)",
                            self.limits.header_timeout_s, self.timed_out)

    def _refuse(self, why: str) -> None:
        self.refused += 1
        self._log_sometimes("refused", "HTTP connection refused: %s (%d so far)", why, self.refused)

    def _log_sometimes(self, kind: str, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._logged_at.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged_at[kind] = now
            log.warning(message, *args)


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 connection with the guard's bounds (see the module docstring)."""

    def __init__(self, guard: ConnectionGuard, **uvicorn_args) -> None:
        super().__init__(**uvicorn_args)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self.address = ""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.address = self.client[0] if self.client else ""
        if not self._guard.admit(self):
            transport.close()
            return
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request head not yet whole (or a next one begun)
            if self._head_timer is None:
                self._await_head()
        else:
            self._cancel_head_timer()
            self._guard.busy(self)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._guard.waiting(self)  # kept alive between requests: uvicorn's keep-alive timeout closes it if idle

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._guard.closed(self)
        super().connection_lost(exc)

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def _await_head(self) -> None:
        self._guard.waiting(self)
        self._head_timer = self.loop.call_later(self._guard.limits.header_timeout_s, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._guard.head_overdue()
            self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


def raise_file_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards `wanted` (as far as its hard limit allows); returns the limit
    now. Warns when it stays below: the connection bounds then come after the process's own limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("open-file limit %d is below the %d the router's connection bounds need (router."
                    "max_connections); raise the hard limit (ulimit -Hn) or lower them", soft, wanted)
    return soft
