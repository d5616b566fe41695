"""How a request can end at the router without a finish reason; the servers map each to a status (gRPC, HTTP).

A worker failing mid-request is not one of them: the request goes on elsewhere (`router.orchestrator`)."""

from __future__ import annotations


class DuplicateRequest(ValueError):
    """A request id this router is running already (ALREADY_EXISTS, 409)."""


class Overloaded(RuntimeError):
    """The admission queue is full: refused at once (RESOURCE_EXHAUSTED, 429), never failed later."""


class Unavailable(RuntimeError):
    """No worker can take the request, or it could not be resumed again (UNAVAILABLE, 503)."""


class WorkerError(RuntimeError):
    """A worker raised while serving the request (a bug, not a failure of the worker): INTERNAL, not resumed."""


class TakenOver(RuntimeError):
    """Another router took the request over (its client reconnected there); this router's stream of it ends
    (ABORTED)."""

