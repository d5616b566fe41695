"""The control plane's gRPC service for its routers (`Control`: Scale and Drain), which pass the operator's Admin
calls on to it. It listens on the control plane's host (127.0.0.1 by default) at a free port, announced in the
registry, and asks for the cluster's bearer token when one is set.

Answers once the workers have started, or drained and stopped. A change the cluster cannot take is
FAILED_PRECONDITION naming the field, an unknown worker NOT_FOUND, a request naming no pool INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging

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

    async def Scale(self, request: pb.ScaleRequest, context: grpc.aio.ServicerContext) -> pb.ScaleResponse:
        wanted = {role: getattr(request, name) for name, role in ROLE_OF_SCALE_FIELD.items() if request.HasField(name)}
        if not wanted:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give at least one of prefill, decode, colocated")
        try:
            started, stopped = await self.scaler.scale(wanted)
        except ScaleError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.ScaleResponse(started=started, stopped=stopped)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        try:
            stopped, started = await self.scaler.drain(request.worker_id, request.replace)
        except UnknownWorker as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ScaleError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.DrainResponse(stopped=stopped, started=started)


async def start_control_service(scaler: Scaler, host: str, token: str | None) -> tuple[grpc.aio.Server, str]:
    """The Control service on `host` at a free port; returns the server and its address."""
    server = grpc.aio.server(interceptors=[BearerToken(token)] if token else [])
    port = server.add_insecure_port(f"{host}:0")
    if port == 0:
        raise OSError(f"the control plane cannot listen on {host}")
    pb_grpc.add_ControlServicer_to_server(ControlService(scaler), server)
    await server.start()
    return server, f"{host}:{port}"
