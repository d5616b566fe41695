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
import logging
import math
import os
import signal

import ray
import redis

from pdserve.cluster.local_redis import LocalRedis
from pdserve.cluster.registry import HEARTBEAT_S, Registry, Role
from pdserve.cluster.state import ClusterState
from pdserve.cluster.worker_runtime import WorkerSpec
from pdserve.config import ClusterConfig, Mode, Pool, load_config
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.request_builder import RequestBuilder
from pdserve.router.server import build_server

log = logging.getLogger(__name__)

CLUSTER = "default"
NAMESPACE = "pdserve"
WORKER_START_TIMEOUT_S = 600


def worker_specs(config: ClusterConfig, redis_url: str, cores: list[int]) -> list[WorkerSpec]:
    """One spec per worker, each pinned to its own cores while there are enough (then they share, in turn)."""
    pools: list[tuple[Role, Pool]] = [(Role.BOTH, config.workers.colocated)] if config.mode is Mode.COLOCATED else [
        (Role.PREFILL, config.workers.prefill), (Role.DECODE, config.workers.decode)]
    names = {Role.PREFILL: "prefill", Role.DECODE: "decode", Role.BOTH: "colocated"}
    specs, next_core = [], 0
    for role, pool in pools:
        for i in range(pool.count):
            n = max(1, math.ceil(pool.resources.cpus))
            mine = tuple(sorted({cores[(next_core + k) % len(cores)] for k in range(n)})) if cores else ()
            next_core += n
            worker_id = f"{names[role]}-{i}"
            specs.append(WorkerSpec(worker_id, role, config.engine, config.kv_transfer, redis_url, CLUSTER,
                                    actor_name=f"{CLUSTER}-{worker_id}", cores=mine))
    return specs


class Supervisor:
    def __init__(self, config: ClusterConfig, state_path: str) -> None:
        self.config = config
        self.state_path = state_path
        self.redis: LocalRedis | None = None
        self.actors: list = []

    async def serve(self, stop: asyncio.Event) -> None:
        try:
            await self._serve(stop)
        finally:
            await self._stop_workers()
            if ray.is_initialized():
                ray.shutdown()
            if self.redis is not None:
                self.redis.stop()
            if os.path.exists(self.state_path):
                os.remove(self.state_path)

    async def _serve(self, stop: asyncio.Event) -> None:
        config = self.config
        if config.redis_url is None:
            self.redis = LocalRedis()
        redis_url = config.redis_url or self.redis.url
        builder = RequestBuilder(config.engine)  # resolves (converts) the model once, before the workers load it
        self._start_ray()
        cores = sorted(os.sched_getaffinity(0)) if config.ray_address is None else []
        specs = worker_specs(config, redis_url, cores)
        await self._start_workers(specs)
        registry = Registry(redis_url, CLUSTER)
        orchestrator = Orchestrator(registry, NAMESPACE, config.mode is Mode.COLOCATED, config.engine.block_size)
        server, port = build_server(builder, orchestrator, config.router.host, config.router.port, config.mode.value)
        await server.start()
        address = f"{config.router.host}:{port}"
        tasks = [asyncio.create_task(orchestrator.membership.run()),
                 asyncio.create_task(_announce(registry, address))]
        ClusterState(os.getpid(), address, redis_url, self.redis.process.pid if self.redis else None,
                     config.mode.value).write(self.state_path)
        log.warning("pdserve router listening on %s (%s, %d workers)", address, config.mode.value, len(specs))
        try:
            await stop.wait()
        finally:
            log.warning("pdserve shutting down")
            await server.stop(grace=2)
            for task in tasks:
                task.cancel()
            await orchestrator.membership.close()

    def _start_ray(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.config.ray_address is not None:
            ray.init(address=self.config.ray_address, namespace=NAMESPACE, logging_level=logging.WARNING)
            return
        pools = self.config.workers
        wanted = sum(p.count * p.resources.cpus for p in (pools.prefill, pools.decode, pools.colocated))
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(wanted)), include_dashboard=False,
                 _node_ip_address="127.0.0.1", namespace=NAMESPACE, logging_level=logging.WARNING)

    async def _start_workers(self, specs: list[WorkerSpec]) -> None:
        pools = {Role.PREFILL: self.config.workers.prefill, Role.DECODE: self.config.workers.decode,
                 Role.BOTH: self.config.workers.colocated}
        for spec in specs:
            cls = PrefillWorker if spec.role is Role.PREFILL else DecodeWorker
            resources = pools[spec.role].resources
            actor = ray.remote(cls).options(name=spec.actor_name, num_cpus=resources.cpus, num_gpus=resources.gpus,
                                            max_concurrency=1000)
            self.actors.append(actor.remote(spec))
        await asyncio.wait_for(asyncio.gather(*(a.start.remote() for a in self.actors)), WORKER_START_TIMEOUT_S)

    async def _stop_workers(self) -> None:
        if not self.actors:
            return
        results = await asyncio.gather(*(a.stop.remote() for a in self.actors), return_exceptions=True)
        for actor, result in zip(self.actors, results):
            if isinstance(result, Exception):
                log.warning("a worker did not stop cleanly: %s", result)
            ray.kill(actor)
        self.actors = []


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    return run(config, args.state)


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
