"""The control plane's gRPC service for its routers (`Control`: Scale and Drain), which pass the operator's Admin
calls on to it. It listens on the control plane's host (127.0.0.1 by default) at a free port, announced in the
registry, and asks for the cluster's bearer token when one is set.

Answers once the workers have started, or drained and stopped. A change the cluster cannot take is
FAILED_PRECONDITION naming the field, an unknown worker NOT_FOUND, a request naming no pool INVALID_ARGUMENT. A change
runs to its end even when its caller goes away (the CLI's deadline, Ctrl-C): stopped between drain and stop, a worker
would stay drained, serving nothing, for good.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

import grpc

from pdserve.access import BearerToken
from pdserve.control_plane.scaler import ScaleError, Scaler, UnknownWorker
from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc
from pdserve.registry.entries import Role

log = logging.getLogger(__name__)

ROLE_OF_SCALE_FIELD = {"prefill": Role.PREFILL, "decode": Role.DECODE, "colocated": Role.BOTH}


class ControlService(pb_grpc.ControlServicer):
    def __init__(self, scaler: Scaler) -> None:
        self.scaler = scaler
        self._changes: set[asyncio.Task] = set()
        """Changes under way (kept here so one whose caller left runs on)."""

    async def Scale(self, request: pb.ScaleRequest, context: grpc.aio.ServicerContext) -> pb.ScaleResponse:
        wanted = {role: getattr(request, name) for name, role in ROLE_OF_SCALE_FIELD.items() if request.HasField(name)}
        if not wanted:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give at least one of prefill, decode, colocated")
        try:
            started, stopped = await self._to_the_end(self.scaler.scale(wanted))
        except ScaleError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.ScaleResponse(started=started, stopped=stopped)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        try:
            stopped, started = await self._to_the_end(self.scaler.drain(request.worker_id, request.replace))
        except UnknownWorker as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ScaleError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.DrainResponse(stopped=stopped, started=started)

    async def _to_the_end(self, change: Awaitable):
        """`change`'s result; it runs on if the caller is cancelled (an error it meets then is logged)."""
        task = asyncio.ensure_future(change)
        self._changes.add(task)
        task.add_done_callback(self._ended)
        return await asyncio.shield(task)

    def _ended(self, task: asyncio.Task) -> None:
        self._changes.discard(task)
        if not task.cancelled() and isinstance(task.exception(), Exception) \
                and not isinstance(task.exception(), ScaleError):
            log.error("a scale or drain failed", exc_info=task.exception())


async def start_control_service(scaler: Scaler, host: str, token: str | None) -> tuple[grpc.aio.Server, str]:
    """The Control service on `host` at a free port; returns the server and its address."""
    server = grpc.aio.server(interceptors=[BearerToken(token)] if token else [])
    port = server.add_insecure_port(f"{host}:0")
    if port == 0:
        raise OSError(f"the control plane cannot listen on {host}")
    pb_grpc.add_ControlServicer_to_server(ControlService(scaler), server)
    await server.start()
    return server, f"{host}:{port}"
