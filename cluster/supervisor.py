"""`pdserve up` in one process: it owns the cluster it starts, and stops all of it on SIGTERM or Ctrl-C.

    python -m pdserve.cluster.supervisor --config FILE --state FILE

Start order: config -> redis-server (local, unless redis_url is set) -> Ray (local, unless ray_address is set) ->
the model resolved once (a GGUF is converted into the cache here, not by every worker) -> the worker actors, which
load the engine and register in Redis -> the router's gRPC server -> the state file (`pdserve status` and
`pdserve down` read it). Stop order is the reverse. The workers are Ray actors owned by this process, so they end
with it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import signal

import ray
import redis

from pdserve.cluster.controller_loop import ControllerLoop, RouterCounts
from pdserve.cluster.local_redis import LocalRedis
from pdserve.cluster.registry import HEARTBEAT_S, Registry
from pdserve.cluster.scaler import CLUSTER, Scaler
from pdserve.cluster.state import ClusterState
from pdserve.cluster.worker_pool import WorkerPool
from pdserve.config import ClusterConfig, Mode, load_config
from pdserve.controller.config import ControllerConfig
from pdserve.controller.scaled_model import ScaledModel
from pdserve.engine.cost_model import CostModel
from pdserve.engine.hardware import hardware
from pdserve.engine.shapes import shape
from pdserve.router.access import Access, load_access
from pdserve.router.http_server import OpenAIServer, RunningHttp, start_http
from pdserve.router.metrics import start_router_metrics
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.request_builder import RequestBuilder
from pdserve.router.server import build_server

log = logging.getLogger(__name__)

NAMESPACE = "pdserve"
LOCAL_CPU_OVERSUBSCRIPTION = 4
"""A local Ray gets this many times the machine's cores as logical CPUs: workers share cores once there are more
of them than cores (`pdserve scale` up to 4x)."""


class Supervisor:
    def __init__(self, config: ClusterConfig, state_path: str) -> None:
        self.config = config
        self.state_path = state_path
        self.redis: LocalRedis | None = None
        self.workers = WorkerPool(config, NAMESPACE)

    async def serve(self, stop: asyncio.Event) -> None:
        try:
            await self._serve(stop)
        finally:
            await self.workers.stop_all()
            if ray.is_initialized():
                ray.shutdown()
            if self.redis is not None:
                self.redis.stop()
            if os.path.exists(self.state_path):
                os.remove(self.state_path)

    async def _serve(self, stop: asyncio.Event) -> None:
        config = self.config
        access = load_access(config.router)  # a bad token or certificate file fails before any worker starts
        if config.redis_url is None:
            if config.ray_address is not None:
                log.warning("redis_url is unset: starting a redis-server on 127.0.0.1, which workers on other "
                            "machines of the Ray cluster cannot reach (set redis_url for a multi-node cluster)")
            self.redis = LocalRedis()
        redis_url = config.redis_url or self.redis.url
        builder = RequestBuilder(config.engine)  # resolves (converts) the model once, before the workers load it
        self._start_ray()
        cores = sorted(os.sched_getaffinity(0)) if config.ray_address is None else []
        registry = Registry(redis_url, CLUSTER)
        orchestrator = Orchestrator(registry, NAMESPACE, config.mode is Mode.COLOCATED, config.engine.block_size,
                                    config.router.max_waiting)
        scaler = Scaler(self.workers, config, redis_url, cores, orchestrator.membership.running)
        specs = scaler.initial_specs()
        await self.workers.start(specs)
        http = await self._http(builder, orchestrator, access)
        server, port = build_server(builder, orchestrator, config.router.host, config.router.port, config.mode.value,
                                    access, scaler, config.slo, http.address if http else "")
        await server.start()
        metrics_server = start_router_metrics(orchestrator.metrics, config.router)
        address = f"{config.router.host}:{port}"
        tasks = [asyncio.create_task(orchestrator.membership.run()),
                 asyncio.create_task(_announce(registry, address)),
                 asyncio.create_task(self.workers.watch())]
        controller = await self._controller(registry, orchestrator) if config.controller.enabled else None
        if controller is not None:
            tasks.append(asyncio.create_task(controller.run()))
        ClusterState(os.getpid(), address, redis_url, self.redis.process.pid if self.redis else None,
                     config.mode.value, metrics_server.address, _absolute(config.router.token_file),
                     _absolute(config.router.tls_cert_file), http.address if http else "",
                     _ray_logs_dir()).write(self.state_path)
        log.warning("pdserve router listening on %s (gRPC)%s (%s, %d workers)", address,
                    f" and http://{http.address} (OpenAI API)" if http else "", config.mode.value, len(specs))
        try:
            await stop.wait()
        finally:
            log.warning("pdserve shutting down")
            await server.stop(grace=2)
            if http is not None:
                await http.stop()
            metrics_server.stop()
            for task in tasks:
                task.cancel()
            if controller is not None:
                await controller.close()
            await orchestrator.membership.close()

    async def _http(self, builder: RequestBuilder, orchestrator: Orchestrator, access: Access) -> RunningHttp | None:
        """The OpenAI-compatible HTTP API, when router.http_port is set."""
        router = self.config.router
        if router.http_port is None:
            return None
        name = router.served_model_name or self.config.engine.model
        app = OpenAIServer(builder, orchestrator, name, access).app()
        tls = (router.tls_cert_file, router.tls_key_file) if router.tls_cert_file else None
        return await start_http(app, router.host, router.http_port, tls)

    async def _controller(self, registry: Registry, orchestrator: Orchestrator) -> ControllerLoop:
        """The ratio controller, with the cost model of a sim engine or a profile of a real one."""
        config = self.config
        engine = config.engine
        if engine.simulated:
            model = ScaledModel(CostModel(shape(engine.model.removeprefix("random:")), hardware(engine.hardware),
                                          engine.tensor_parallel), engine.sim_time_scale)
        else:
            first = next(iter(self.workers.actors.values()))
            model = await first.profile.remote()
            log.warning("controller: profiled %s: %s", next(iter(self.workers.actors)), model)
        info = (await asyncio.to_thread(registry.workers))[0]
        settings = config.controller
        controller_config = ControllerConfig(
            slo_ttft_s=config.slo.ttft_s, slo_tpot_s=config.slo.tpot_s, interval_s=settings.interval_s,
            cooldown_s=settings.cooldown_s, max_moves=settings.max_moves, pin=settings.pin,
            confirm_ticks=settings.confirm_ticks, rebalance_load=settings.rebalance_load,
            shift_ratio=settings.shift_ratio, warmup_s=settings.warmup_s,
            max_num_seqs=engine.max_num_seqs,
            kv_capacity_tokens=info.kv_blocks_total * engine.block_size)
        counts = lambda: RouterCounts(orchestrator.accepted_total, orchestrator.waiting_count,  # noqa: E731
                                      orchestrator.accepted_prompt_tokens, tuple(orchestrator.accepted_by_class))
        return ControllerLoop(controller_config, model, registry, self.workers, counts, settings.window_s,
                              settings.dry_run)

    def _start_ray(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.config.ray_address is not None:
            ray.init(address=self.config.ray_address, namespace=NAMESPACE, logging_level=logging.WARNING)
            return
        pools = self.config.workers
        wanted = sum(p.count * p.resources.cpus for p in (pools.prefill, pools.decode, pools.colocated))
        # Ray's CPUs only place actors here (the workers pin their own cores), so leave room for `pdserve scale`.
        cpus = max(os.cpu_count() or 1, math.ceil(wanted)) * LOCAL_CPU_OVERSUBSCRIPTION
        ray.init(num_cpus=cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", namespace=NAMESPACE, logging_level=logging.WARNING)


async def _announce(registry: Registry, address: str) -> None:
    while True:
        try:
            await asyncio.to_thread(registry.set_router, address)
        except redis.RedisError as e:
            log.warning("router heartbeat failed: %s", e)
        await asyncio.sleep(HEARTBEAT_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.cluster.supervisor")
    parser.add_argument("--config", default=None)
    parser.add_argument("--state", required=True)
    parser.add_argument("--ray-address", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    if args.ray_address:
        config = dataclasses.replace(config, ray_address=args.ray_address)
    return run(config, args.state)


def _ray_logs_dir() -> str:
    """This Ray session's log folder (Ray names it only in a private API; empty if that moved)."""
    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_logs_dir_path() if node is not None else ""


def _absolute(path: str | None) -> str:
    return os.path.abspath(path) if path else ""


def run(config: ClusterConfig, state_path: str) -> int:
    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Supervisor(config, state_path).serve(stop)

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
