"""A router process: the gRPC and HTTP servers and a Prometheus port over one orchestrator, joined to a running
cluster through its registry. Any number of them serve the same workers at once; a router owns nothing that
outlives it but its requests' leases on the decode workers.

Its life:

    the cluster's settings from the registry (the config and the Ray address the control plane published)
    -> Ray, as a driver in the workers' namespace -> the request builder (tokenizer, context length)
    -> membership: it finds every worker in the registry and starts collecting their events for this router
    -> the servers (their ports are this router's alone; with the HTTP port, a Batch API runner that takes open
       batches by lease) -> its `RouterInfo` in the registry every second (with a
       TTL, and the arrival counters the ratio controller sums); it stops when the cluster's stop flag is set
    -> on stop (SIGTERM, SIGINT, the flag): no new calls, running streams get a grace period, it leaves the registry.

Its id is new with every process (`router-<hex>`), so a restarted router never takes the leases of the one before:
its clients reconnect and their requests are taken over (`router.orchestrator`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid

import ray
import redis

from pdserve.access import load_access
from pdserve.config import ClusterConfig, Mode, config_from_json
from pdserve.registry.entries import ClusterSettings, RouterInfo
from pdserve.registry.kv_events import KVEventLog
from pdserve.registry.registry import CLUSTER, HEARTBEAT_S, Registry
from pdserve.router.batch_api import BatchAPI
from pdserve.router.batch_runner import BatchRunner
from pdserve.router.batch_store import BatchStore, default_files_dir
from pdserve.router.connection_guard import ConnectionLimits, raise_file_limit
from pdserve.router.control_client import ControlClient
from pdserve.router.http_server import OpenAIServer
from pdserve.router.http_serving import RunningHttp, start_http
from pdserve.router.kv_index import KVIndex, KVIndexFollower
from pdserve.router.main import Listen
from pdserve.router.metrics import start_router_metrics
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.request_builder import RequestBuilder
from pdserve.router.server import build_server

log = logging.getLogger(__name__)

SETTINGS_WAIT_S = 30.0
STOP_GRACE_S = 2.0
RESERVED_FILES = 1024
"""File descriptors a router needs beside its clients' connections (Ray, Redis, workers, logs)."""


class NoCluster(RuntimeError):
    """The registry has no cluster settings: no control plane has started a cluster on this Redis."""


def new_router_id() -> str:
    return f"router-{uuid.uuid4().hex[:8]}"


async def settings_of(registry: Registry, wait_s: float = SETTINGS_WAIT_S) -> ClusterSettings:
    """The cluster's settings, waiting up to `wait_s` for a control plane that is starting to publish them."""
    deadline = time.monotonic() + wait_s
    while True:
        settings = await asyncio.to_thread(registry.settings)
        if settings is not None:
            return settings
        if time.monotonic() > deadline:
            raise NoCluster("no cluster in this Redis (start one with `pdserve up`)")
        await asyncio.sleep(0.2)


class RouterProcess:
    def __init__(self, redis_url: str, listen: Listen | None = None, router_id: str | None = None) -> None:
        self.redis_url = redis_url
        self.listen = listen or Listen()
        self.router_id = router_id or new_router_id()
        self.registry = Registry(redis_url, CLUSTER)
        self._batches: asyncio.Task | None = None
        """Runs the Batch API's batches (with the HTTP port)."""

    async def serve(self, stop: asyncio.Event) -> None:
        settings = await settings_of(self.registry)
        config = config_from_json(settings.config)
        raise_file_limit(2 * config.router.max_connections + RESERVED_FILES)
        access = load_access(config.router)
        if not ray.is_initialized():
            _join_ray(settings)
        builder = RequestBuilder(config.engine)
        follower = self._kv_index_follower(config)
        orchestrator = Orchestrator(self.registry, settings.namespace, config.mode is Mode.COLOCATED,
                                    config.engine.block_size, config.router.max_waiting, self.router_id,
                                    follower.index if follower else None, config.router.cache_weight,
                                    config.router.worker_wait_s, config.router.low_priority_limit)
        host = self.listen.host or config.router.host
        if follower is not None:
            follower.live = lambda: orchestrator.membership.members
        membership = asyncio.create_task(orchestrator.membership.run(), name="membership")
        following = asyncio.create_task(follower.run(), name="kv-index") if follower else None
        http = await self._http(config, host, builder, orchestrator, access)
        server, port = build_server(builder, orchestrator, host, _port(self.listen.port, config.router.port),
                                    config.mode.value, access, ControlClient(self.registry, access.token),
                                    config.slo, http.address if http else "", config.router)
        await server.start()
        metrics = start_router_metrics(orchestrator.metrics, _port(self.listen.metrics_port,
                                                                   config.router.metrics_port) or 0)
        info = RouterInfo(self.router_id, f"{host}:{port}", os.getpid(), http.address if http else "",
                          metrics.address, time.time())
        announce = asyncio.create_task(self._announce(info, orchestrator, stop), name="announce")
        log.warning("router %s serving on %s (gRPC)%s, metrics on %s", self.router_id, info.address,
                    f" and http://{http.address} (OpenAI API)" if http else "", metrics.address)
        try:
            await stop.wait()
        finally:
            log.warning("router %s stopping", self.router_id)
            announce.cancel()
            await server.stop(grace=STOP_GRACE_S)
            if http is not None:
                self._batches.cancel()
                await asyncio.gather(self._batches, return_exceptions=True)
                await http.stop()
            metrics.stop()
            membership.cancel()
            if following is not None:
                following.cancel()
            await orchestrator.membership.close()
            await asyncio.to_thread(self._leave)

    def _kv_index_follower(self, config: ClusterConfig) -> KVIndexFollower | None:
        """KV-aware routing's index, rebuilt from the cache events in Redis and followed (with prefix caching on and
        router.routing kv_aware); None otherwise."""
        if config.router.routing != "kv_aware" or not config.engine.prefix_caching:
            return None
        return KVIndexFollower(KVIndex(), KVEventLog(self.registry.redis, self.registry.prefix))

    async def _http(self, config: ClusterConfig, host: str, builder: RequestBuilder, orchestrator: Orchestrator,
                    access) -> RunningHttp | None:
        """The OpenAI-compatible HTTP API, unless its port is off (router.http_port null)."""
        port = _port(self.listen.http_port, config.router.http_port)
        if port is None:
            return None
        router = config.router
        store = BatchStore(self.registry.redis, self.registry.prefix, router.files_dir or default_files_dir())
        server = OpenAIServer(builder, orchestrator, router.served_model_name or config.engine.model, access,
                              router.max_body_bytes, BatchAPI(store), router.max_file_bytes)
        runner = BatchRunner(store, server.batch_answer, self.router_id, 2 * router.low_priority_limit)
        self._batches = asyncio.create_task(runner.run(), name="batch-runner")
        app = server.app()
        tls = (router.tls_cert_file, router.tls_key_file) if router.tls_cert_file else None
        limits = ConnectionLimits(router.max_connections, router.max_connections_per_address,
                                  router.header_timeout_s)
        return await start_http(app, host, port, tls, limits)

    async def _announce(self, info: RouterInfo, orchestrator: Orchestrator, stop: asyncio.Event) -> None:
        """This router's entry in the registry every second, until the cluster asks its routers to stop."""
        failing = False
        admission = orchestrator.admission
        while True:
            now = RouterInfo(info.router_id, info.address, info.pid, info.http_address, info.metrics_address,
                             info.started_at, admission.in_flight_count, admission.waiting_count,
                             admission.accepted_total, admission.accepted_prompt_tokens,
                             tuple(admission.accepted_by_class))
            try:
                stopping = await asyncio.to_thread(self._beat, now)
                failing = False
            except redis.RedisError as e:  # serving goes on; the entry comes back with Redis
                if not failing:
                    log.warning("router %s: registry unreachable: %s", self.router_id, e)
                failing = True
                stopping = False
            if stopping:
                log.warning("router %s: the cluster is stopping", self.router_id)
                stop.set()
                return
            await asyncio.sleep(HEARTBEAT_S)

    def _beat(self, info: RouterInfo) -> bool:
        self.registry.announce_router(info)
        return self.registry.stop_requested()

    def _leave(self) -> None:
        try:
            self.registry.remove_router(self.router_id)
        except redis.RedisError as e:
            log.warning("router %s could not leave the registry: %s", self.router_id, e)


def _join_ray(settings: ClusterSettings) -> None:
    """Join the cluster's Ray as a driver, keeping this process's SIGTERM handler: `ray.init` on the main thread
    replaces it with one that exits at once, which skipped the stop above (no grace for running streams, no leaving
    the registry) whenever a router was sent SIGTERM (`pdserve down`, Kubernetes ending a pod)."""
    handler = signal.getsignal(signal.SIGTERM)
    ray.init(address=settings.ray_address, namespace=settings.namespace, logging_level=logging.WARNING)
    if handler is not None and signal.getsignal(signal.SIGTERM) is not handler:
        signal.signal(signal.SIGTERM, handler)


def _port(given: int | None, configured: int | None) -> int | None:
    return configured if given is None else given
