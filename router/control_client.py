"""The router's way to the control plane: the operator's Scale and Drain (Admin) go on to it, as it owns the
workers. Its address comes from the registry; while it is down, these calls are UNAVAILABLE and serving goes on."""

from __future__ import annotations

import asyncio

import grpc

from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc
from pdserve.registry.registry import Registry

AUTHORIZATION = "authorization"


CONTROL_DOWN = ("the control plane is not running, so workers cannot be started or stopped now (serving goes on; "
                "`pdserve up` starts it again and it adopts the cluster)")


class ControlPlaneDown(RuntimeError):
    """No control plane is registered (it is not running)."""


class ControlClient:
    def __init__(self, registry: Registry | None, token: str | None = None) -> None:
        self.registry = registry
        self.metadata = ((AUTHORIZATION, f"Bearer {token}"),) if token else None

    async def address(self) -> str:
        address = await asyncio.to_thread(self.registry.control) if self.registry is not None else None
        if address is None:
            raise ControlPlaneDown(CONTROL_DOWN)
        return address

    async def scale(self, request: pb.ScaleRequest, timeout_s: float | None) -> pb.ScaleResponse:
        async with grpc.aio.insecure_channel(await self.address()) as channel:
            return await pb_grpc.ControlStub(channel).Scale(request, timeout=timeout_s, metadata=self.metadata)

    async def drain(self, request: pb.DrainRequest, timeout_s: float | None) -> pb.DrainResponse:
        async with grpc.aio.insecure_channel(await self.address()) as channel:
            return await pb_grpc.ControlStub(channel).Drain(request, timeout=timeout_s, metadata=self.metadata)
