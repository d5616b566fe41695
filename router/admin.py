"""The router's Admin gRPC service: the cluster's status and health, and the operator's scale and drain.

Status reads the workers from the router's membership (their last heartbeats), every router and the control plane
from the registry, and the latency of the requests that finished in the last STATUS_WINDOW_S from the registry's
timings stream (the one the ratio controller reads): p90 TTFT and TPOT against the SLOs, for the cluster and per
worker (TTFT for the worker that prefilled, TPOT for the one that decoded). Scale and Drain go on to the control
plane, which owns the workers, and answer once the workers have started or drained and stopped; a change the
cluster cannot take is FAILED_PRECONDITION, NOT_FOUND or INVALID_ARGUMENT with the field named, and UNAVAILABLE
while the control plane is down.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import grpc
import redis

from pdserve.config import SLO
from pdserve.controller.window import finished_requests, traffic_window
from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc
from pdserve.registry.entries import Role, RouterInfo, WorkerInfo
from pdserve.router.control_client import CONTROL_DOWN, ControlClient, ControlPlaneDown
from pdserve.router.orchestrator import Orchestrator

log = logging.getLogger(__name__)

STATUS_WINDOW_S = 60.0
SCALE_FIELDS = ("prefill", "decode", "colocated")


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, orchestrator: Orchestrator, address: str, mode: str, control: ControlClient | None = None,
                 slo: SLO | None = None, http_address: str = "") -> None:
        """`control`: the way to the control plane (None: Scale and Drain are UNAVAILABLE)."""
        self.orchestrator = orchestrator
        self.address = address
        self.mode = mode
        self.control = control or ControlClient(None)
        self.slo = slo or SLO()
        self.http_address = http_address
        """host:port of the OpenAI-compatible HTTP server; empty when it is off."""

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        infos = sorted((m.info for m in self.orchestrator.membership.members.values()), key=lambda w: w.worker_id)
        timings, routers, control = await self._cluster()
        latency, per_worker = latency_summary(timings, {w.worker_id: w.role for w in infos}, self.slo)
        return pb.StatusResponse(router_address=self.address, mode=self.mode, http_address=self.http_address,
                                 latency=latency, requests_in_flight=self.orchestrator.in_flight_count,
                                 requests_waiting=self.orchestrator.waiting_count,
                                 workers=[_worker_status(w, per_worker.get(w.worker_id)) for w in infos],
                                 routers=[_router_status(r) for r in routers], router_id=self.orchestrator.router_id,
                                 control_address=control or "")

    async def _cluster(self) -> tuple[list[dict[str, str]], list[RouterInfo], str | None]:
        """The registry's timings window, routers and control plane (what it can read: Redis may be away)."""
        registry = self.orchestrator.registry
        if registry is None:
            return [], [], None
        try:
            return await asyncio.to_thread(lambda: (registry.timings_since(STATUS_WINDOW_S), registry.routers(),
                                                    registry.control()))
        except redis.RedisError as e:  # the status still shows the workers
            log.warning("status: the registry is unreadable: %s", e)
            return [], [], None

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        detail = unhealthy_reason(self.orchestrator)
        return pb.HealthResponse(healthy=not detail, detail=detail or "serving")

    async def Scale(self, request: pb.ScaleRequest, context: grpc.aio.ServicerContext) -> pb.ScaleResponse:
        if not any(request.HasField(name) for name in SCALE_FIELDS):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give at least one of prefill, decode, colocated")
        return await self._forward(self.control.scale, request, context)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        return await self._forward(self.control.drain, request, context)

    async def _forward(self, call, request, context: grpc.aio.ServicerContext):
        """The control plane's answer, or its error with the same status and message."""
        try:
            return await call(request, context.time_remaining())
        except ControlPlaneDown as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.UNAVAILABLE:  # its service never says so itself: it is not there
                await context.abort(e.code(), f"{CONTROL_DOWN} ({e.details()})")
            await context.abort(e.code(), e.details())


def unhealthy_reason(orchestrator: Orchestrator) -> str:
    """Why the router cannot serve now ("" when it can): no ready worker, or no paired prefill and decode ones."""
    membership = orchestrator.membership
    if orchestrator.colocated:
        return "" if membership.ready(Role.BOTH) else "no colocated worker is ready"
    decode = membership.ready(Role.DECODE)
    if not any(membership.prefill_for(d.info.worker_id) for d in decode):
        ready = {r.value: len(membership.ready(r)) for r in (Role.PREFILL, Role.DECODE)}
        return f"no paired prefill and decode workers yet (ready: {ready})"
    return ""


def latency_summary(timings: list[dict[str, str]], roles: dict[str, Role],
                    slo: SLO) -> tuple[pb.Latency, dict[str, pb.WorkerStatus]]:
    """The cluster's p90 TTFT/TPOT and SLO attainment over the timings entries, and per worker in `roles` its own
    (as WorkerStatus fields: ttft_p90_s for a worker that prefills, tpot_p90_s for one that decodes)."""
    latency = pb.Latency(window_s=STATUS_WINDOW_S, slo_ttft_s=slo.ttft_s, slo_tpot_s=slo.tpot_s)
    window = traffic_window(finished_requests(timings), 0.0, STATUS_WINDOW_S, slo.ttft_s, slo.tpot_s)
    latency.finished = window.finished
    if window.finished:
        latency.ttft_p90_s, latency.tpot_p90_s = window.ttft_p90_s, window.tpot_p90_s
        latency.slo_met_fraction = window.attainment
    served: dict[str, list[dict[str, str]]] = defaultdict(list)
    for entry in timings:
        for worker_id in entry.get("workers", "").split(","):
            if worker_id in roles:
                served[worker_id].append(entry)
    per_worker = {}
    for worker_id, entries in served.items():
        mine = traffic_window(finished_requests(entries), 0.0, STATUS_WINDOW_S, slo.ttft_s, slo.tpot_s)
        fields = pb.WorkerStatus(finished_requests=mine.finished)
        if mine.finished and roles[worker_id] in (Role.PREFILL, Role.BOTH):
            fields.ttft_p90_s = mine.ttft_p90_s
        if mine.finished and roles[worker_id] in (Role.DECODE, Role.BOTH):
            fields.tpot_p90_s = mine.tpot_p90_s
        per_worker[worker_id] = fields
    return latency, per_worker


def _router_status(r: RouterInfo) -> pb.RouterStatus:
    return pb.RouterStatus(router_id=r.router_id, address=r.address, http_address=r.http_address, pid=r.pid,
                           requests_in_flight=r.requests_in_flight, requests_waiting=r.requests_waiting,
                           started_at=r.started_at)


def _worker_status(w: WorkerInfo, latency: pb.WorkerStatus | None) -> pb.WorkerStatus:
    status = pb.WorkerStatus(worker_id=w.worker_id, role=w.role.value, pid=w.pid, state=w.state.value,
                             running_requests=w.running, waiting_requests=w.waiting, kv_blocks_used=w.kv_blocks_used,
                             kv_blocks_total=w.kv_blocks_total, prefix_cache_hit_rate=w.prefix_cache_hit_rate,
                             speculative_acceptance_rate=w.speculative_acceptance_rate,
                             speculative_tokens_per_step=w.speculative_tokens_per_step)
    if latency is not None:
        status.MergeFrom(latency)
    return status
