"""`pdserve up`'s process: it starts a cluster, or adopts the one a previous control plane left running, and keeps
it whole until told to stop.

Start order: config -> redis-server (local unless redis_url is set; adopted if the last one still runs) -> a Ray head
of its own (unless ray_address is set; adopted likewise), joined as a driver -> the settings routers start from, in
the registry -> the model resolved once (a GGUF is converted into the cache here, not by every worker) -> the worker
actors (detached; adopted if any run) -> the routers (processes; adopted likewise) -> its Control service for the
routers -> the ratio controller, if enabled -> the state file (`pdserve status`, `pdserve down`).

While it runs it replaces workers that die (`WorkerPool.watch`) and starts again routers that exit
(`RouterPool.watch`). Killed, it leaves the cluster serving: workers, routers, Redis and Ray run on, and `pdserve up`
again adopts them. Stopped (SIGTERM, SIGINT), it stops everything it started, in reverse order. Failing (an error
it did not expect), it stops what it started for a new cluster, but a cluster it adopted is left serving, as if it
had been killed: a control plane restarted on a live cluster must never be what takes it down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from dataclasses import dataclass

import ray
import redis

from pdserve.access import load_access
from pdserve.config import ClusterConfig, config_to_json
from pdserve.control_plane.control_service import start_control_service
from pdserve.control_plane.controller_loop import ControllerLoop
from pdserve.control_plane.local_redis import LocalRedis, free_port
from pdserve.control_plane.ray_head import RayHead, StartingHead, join_ray, local_cpus
from pdserve.control_plane.router_pool import RouterPool, RouterSlot
from pdserve.control_plane.scaler import Scaler
from pdserve.control_plane.state_file import ClusterState
from pdserve.control_plane.worker_pool import WorkerPool
from pdserve.controller.config import ControllerConfig, ControllerConfigError
from pdserve.controller.policy import BUILT_IN, PolicyContext, load_policy, policy_class
from pdserve.controller.scaled_model import ScaledModel
from pdserve.engine.cost_model import CostModel
from pdserve.engine.hardware import hardware
from pdserve.engine.model_source import resolve_engine_model
from pdserve.engine.shapes import shape
from pdserve.engine.step_profile import EngineBusy, StepProfile
from pdserve.registry.entries import ClusterSettings, Role
from pdserve.registry.registry import CLUSTER, HEARTBEAT_S, Registry

log = logging.getLogger(__name__)

NAMESPACE = "pdserve"
PROFILE_WAIT_S = 120.0
"""How long the controller waits for an idle worker to profile at start (then it waits CONTROLLER_RETRY_S, and
tries again)."""
CONTROLLER_RETRY_S = 10.0


@dataclass
class _Started:
    """What this control plane started (it stops these, and only these)."""

    redis: LocalRedis | None = None
    ray_head: RayHead | None = None


class ControlPlane:
    def __init__(self, config: ClusterConfig, state_path: str, ray_token_file: str = "",
                 starting_head: StartingHead | None = None) -> None:
        """`ray_token_file`: the token a Ray head of the cluster's own asks for (`ray_head.token_for`); this
        process's environment must name it already (`ray_head.auth_env`), as Ray reads it on import.
        `starting_head`: the cluster's new head, launched already (`control_plane.main`); it is this control plane's
        to wait for and to stop."""
        self.config = config
        self.state_path = state_path
        self.ray_token_file = ray_token_file
        self.previous = ClusterState.read(state_path) if os.path.exists(state_path) else None
        """The state a previous control plane left: what may still run, to adopt."""
        self.started = _Started(ray_head=starting_head.head if starting_head else None)
        self.starting_head = starting_head
        self.workers: WorkerPool | None = None
        self.routers: RouterPool | None = None
        self.controller: ControllerLoop | None = None
        self.state: ClusterState | None = None
        self.adopted = False
        """It adopted a running cluster (its Redis, Ray head or workers)."""

    async def serve(self, stop: asyncio.Event) -> None:
        failed = False
        try:
            await self._serve(stop)
        except Exception:
            failed = True
            raise
        finally:
            if failed and self.adopted:
                log.error("the control plane failed; the cluster it adopted is left serving (`pdserve up` adopts it "
                          "again, `pdserve down` stops it)")
            else:
                await self._stop_all()

    async def _serve(self, stop: asyncio.Event) -> None:
        config = self.config
        access = load_access(config.router)  # a bad token or certificate file fails before anything starts
        redis_url, redis_pid = self._redis()
        ray_address, ray_head_pid = await asyncio.to_thread(self._ray)
        registry = Registry(redis_url, CLUSTER)
        resolve_engine_model(config.engine)  # converts a GGUF once, before the workers (and routers) load it
        await asyncio.to_thread(self._publish, registry, ray_address)
        self.workers = WorkerPool(config, NAMESPACE, CLUSTER, registry)
        scaler = Scaler(self.workers, config, redis_url, self._cores(), self.workers.running)
        adopted = await self.workers.adopt()
        self.adopted = self.adopted or adopted
        self.routers = RouterPool(redis_url, self._slots())
        self.routers.start(await asyncio.to_thread(registry.routers))
        self._write_state(redis_url, redis_pid, ray_address, ray_head_pid)
        if not adopted:
            await self.workers.start(scaler.initial_specs())
        control, control_address = await start_control_service(scaler, "127.0.0.1", access.token)
        tasks = [asyncio.create_task(self.workers.watch(), name="workers"),
                 asyncio.create_task(self.routers.watch(self._rewrite_state), name="routers"),
                 asyncio.create_task(_announce(registry, control_address), name="announce")]
        if config.controller.enabled:
            policy_class(config.controller.policy)  # a policy that cannot be loaded fails `up` at once, by name
            tasks.append(asyncio.create_task(self._control(registry, scaler, adopted), name="controller"))
        for task in tasks:
            task.add_done_callback(_log_failure)
        log.warning("pdserve control plane up (%s): %d workers%s, routers on %s, control service on %s",
                    config.mode.value, len(self.workers.specs), " adopted" if adopted else "",
                    ", ".join(s.address for s in self.routers.slots), control_address)
        try:
            await stop.wait()
        finally:
            log.warning("pdserve shutting down")
            for task in tasks:
                task.cancel()
            if self.controller is not None:
                await self.controller.close()
            await control.stop(grace=1)
            await asyncio.to_thread(_withdraw, registry)

    # ---- what it starts or adopts ----------------------------------------------------------------------------
    def _redis(self) -> tuple[str, int | None]:
        """The cluster's Redis: the configured one, the local one a previous control plane left, or a new one."""
        if self.config.redis_url is not None:
            return self.config.redis_url, None
        previous = self.previous
        if previous is not None and previous.redis_pid is not None:
            adopted = LocalRedis.adopt(previous.redis_url, previous.redis_pid)
            if adopted is not None:
                log.warning("adopted the running redis-server at %s (pid %d)", adopted.url, adopted.pid)
                self.adopted = True
                self.started.redis = adopted
                return adopted.url, adopted.pid
        if self.config.ray_address is not None:
            log.warning("redis_url is unset: starting a redis-server on 127.0.0.1, which workers on other "
                        "machines of the Ray cluster cannot reach (set redis_url for a multi-node cluster)")
        self.started.redis = LocalRedis.start()
        return self.started.redis.url, self.started.redis.pid

    def _ray(self) -> tuple[str, int | None]:
        """Join the configured Ray cluster, the head a previous control plane left, or a new head of our own."""
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.config.ray_address is not None:
            join_ray(self.config.ray_address, NAMESPACE)
            return self.config.ray_address, None
        head = self._adopted_head() if self.starting_head is None else self.starting_head.wait_ready()
        if head is None:
            head = RayHead.start(local_cpus(self.config), self.ray_token_file)
        self.started.ray_head = head
        join_ray(head.address, NAMESPACE)
        return head.address, head.pid

    def _adopted_head(self) -> RayHead | None:
        """The head a previous control plane left, if it still runs and answers."""
        previous = self.previous
        if previous is None or previous.ray_head_pid is None:
            return None
        head = RayHead.adopt(previous.ray_address, previous.ray_head_pid, previous.ray_token_file)
        if head is not None:
            log.warning("adopted the running Ray head at %s (pid %d)", head.address, head.pid)
            self.adopted = True
        return head

    def _publish(self, registry: Registry, ray_address: str) -> None:
        registry.clear_stop()
        registry.publish_settings(ClusterSettings(config_to_json(self.config), ray_address, NAMESPACE))

    def _cores(self) -> list[int]:
        """This machine's cores to pin workers to (none on a joined Ray cluster: Ray places them)."""
        return sorted(os.sched_getaffinity(0)) if self.config.ray_address is None else []

    def _slots(self) -> list[RouterSlot]:
        """The router this control plane keeps running, on the same ports as the last one's."""
        router = self.config.router
        previous_metrics = self.previous.metrics_address.rsplit(":", 1)[-1] if self.previous else ""
        metrics_port = router.metrics_port or (int(previous_metrics) if previous_metrics else free_port())
        return [RouterSlot(router.host, router.port, router.http_port, metrics_port)]

    async def _control(self, registry: Registry, scaler: Scaler, adopted: bool) -> None:
        """Make the controller, then run it. Making it can wait (a real engine's profile needs an idle worker, and
        a cluster adopted under load may have none for a while) or fail for a moment (a worker dies meanwhile): the
        cluster serves on regardless, and it is tried again every CONTROLLER_RETRY_S. (It used to be made before
        the control plane settled, and a failure there stopped the whole cluster, adopted ones included.)"""
        while self.controller is None:
            try:
                self.controller = await self._controller(registry, scaler, adopted)
            except (EngineBusy, ray.exceptions.RayError, redis.RedisError) as e:
                log.warning("controller: not started yet (%s); trying again in %g s", e, CONTROLLER_RETRY_S)
                await asyncio.sleep(CONTROLLER_RETRY_S)
            except ControllerConfigError as e:  # the policy refused its settings: no controller, said plainly
                log.error("controller: not started: %s", e)
                return
        log.warning("controller: started (policy %s)", self.config.controller.policy or BUILT_IN)
        await self.controller.run()

    async def _controller(self, registry: Registry, scaler: Scaler, adopted: bool) -> ControllerLoop:
        """The controller's policy (the built-in ratio controller unless `controller.policy` names another), with the
        cost model of a sim engine or a profile of a real one."""
        config = self.config
        decode = self.workers.engine(Role.DECODE)
        if decode.simulated:
            sim = decode.sim
            model = ScaledModel(CostModel(shape(decode.model.removeprefix("random:")), hardware(sim.hardware),
                                          sim.tensor_parallel), sim.time_scale)
        else:
            model = await self._profile(registry, adopted)
        decode_actor = next(self.workers.actors[i] for i, s in self.workers.specs.items() if s.role is Role.DECODE)
        info = await decode_actor.info.remote()  # its KV capacity, as its engine sized it
        settings = config.controller
        controller_config = ControllerConfig(
            slo_ttft_s=config.slo.ttft_s, slo_tpot_s=config.slo.tpot_s, interval_s=settings.interval_s,
            cooldown_s=settings.cooldown_s, max_moves=settings.max_moves, pin=settings.pin,
            confirm_ticks=settings.confirm_ticks,
            shift_ratio=settings.shift_ratio, warmup_s=settings.warmup_s, max_num_seqs=decode.max_num_seqs,
            kv_capacity_tokens=info.kv_blocks_total * decode.block_size, min_workers=settings.min_workers,
            max_workers=settings.max_workers, min_prefill=settings.min_prefill, max_prefill=settings.max_prefill,
            min_decode=settings.min_decode, max_decode=settings.max_decode,
            scale_down_cooldown_s=settings.scale_down_cooldown_s, min_gain=settings.min_gain,
            target_load=settings.target_load, scale_down_load=settings.scale_down_load)
        policy = load_policy(settings.policy, PolicyContext(controller_config, model), settings.policy_config)
        return ControllerLoop(controller_config, policy, registry, scaler, settings.window_s, settings.dry_run,
                              settings.add_timeout_s)

    async def _profile(self, registry: Registry, adopted: bool) -> StepProfile:
        """A profile of the workers' engine: with adopted workers (the same engines), the one the last control plane
        measured and kept in the registry; else measured now on a worker, and kept. The routers serve before the
        controller starts, so each worker may be busy: try each in turn until one is idle (up to PROFILE_WAIT_S)."""
        if adopted:
            kept = await asyncio.to_thread(registry.step_profile)
            try:
                profile = StepProfile(**json.loads(kept)) if kept is not None else None
            except (TypeError, ValueError):  # kept by another version: measure it again
                profile = None
            if profile is not None:
                log.warning("controller: the adopted workers' profile, as measured before: %s", profile)
                return profile
        deadline = asyncio.get_running_loop().time() + PROFILE_WAIT_S
        while True:
            for worker_id, actor in list(self.workers.actors.items()):
                try:
                    profile = await actor.profile.remote()
                except EngineBusy:
                    continue
                log.warning("controller: profiled %s: %s", worker_id, profile)
                await asyncio.to_thread(registry.publish_step_profile, json.dumps(dataclasses.asdict(profile)))
                return profile
            if asyncio.get_running_loop().time() > deadline:
                raise EngineBusy(f"controller: no worker was idle to profile within {PROFILE_WAIT_S:g} s")
            await asyncio.sleep(0.2)

    # ---- the state file --------------------------------------------------------------------------------------
    def _write_state(self, redis_url: str, redis_pid: int | None, ray_address: str, ray_head_pid: int | None) -> None:
        router = self.config.router
        slot = self.routers.slots[0]
        self.state = ClusterState(
            os.getpid(), slot.address, redis_url, redis_pid, self.config.mode.value, f"127.0.0.1:{slot.metrics_port}",
            _absolute(router.token_file), _absolute(router.tls_cert_file), slot.http_address, _ray_logs_dir(),
            ray_address, ray_head_pid, self.started.ray_head.token_file if self.started.ray_head else "",
            self.routers.pids)
        self.state.write(self.state_path)

    def _rewrite_state(self) -> None:
        """The routers' pids changed (one was started again)."""
        if self.state is not None:
            self.state = ClusterState(**{**self.state.__dict__, "router_pids": self.routers.pids})
            self.state.write(self.state_path)

    async def _stop_all(self) -> None:
        """Stop what runs, in reverse order: routers, workers, Ray, Redis; then the state file goes."""
        registry = Registry(self.state.redis_url, CLUSTER) if self.state is not None else None
        if registry is not None:
            await asyncio.to_thread(_ask_routers_to_stop, registry)
        if self.routers is not None:
            await self.routers.stop()
        if self.workers is not None:
            await self.workers.stop_all()
        if ray.is_initialized():
            ray.shutdown()
        if self.started.ray_head is not None:
            await asyncio.to_thread(self.started.ray_head.stop)
        if self.started.redis is not None:
            await asyncio.to_thread(self.started.redis.stop)
        if os.path.exists(self.state_path):
            os.remove(self.state_path)


async def _announce(registry: Registry, address: str) -> None:
    """The Control service's address in the registry every second (with a TTL: it goes when this process does)."""
    failing = False
    while True:
        try:
            await asyncio.to_thread(registry.announce_control, address)
            failing = False
        except redis.RedisError as e:
            if not failing:
                log.warning("control plane: registry unreachable: %s", e)
            failing = True
        await asyncio.sleep(HEARTBEAT_S)


def _log_failure(task: asyncio.Task) -> None:
    """A task of the control plane (watching workers or routers, announcing, the controller) ended by an error it
    did not expect: said in the log at once, not at exit."""
    if not task.cancelled() and task.exception() is not None:
        log.error("control plane: its %s task failed", task.get_name(), exc_info=task.exception())


def _withdraw(registry: Registry) -> None:
    try:
        registry.withdraw_control()
    except redis.RedisError as e:
        log.warning("control plane: could not leave the registry: %s", e)


def _ask_routers_to_stop(registry: Registry) -> None:
    """Every router of the cluster (those `pdserve router` started too) stops on seeing the flag."""
    try:
        registry.request_stop()
    except redis.RedisError as e:
        log.warning("could not ask the routers to stop through the registry: %s", e)


def _ray_logs_dir() -> str:
    """This Ray session's log folder (Ray names it only in a private API; empty if that moved)."""
    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_logs_dir_path() if node is not None else ""


def _absolute(path: str | None) -> str:
    return os.path.abspath(path) if path else ""
