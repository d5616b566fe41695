"""What every worker has, whatever its role: an engine on its own thread, a KV connector, a heartbeat, its
Prometheus metrics (served on 127.0.0.1, the port in its registry entry), and the place its KV pairs meet
(`kv_transfer.rendezvous`; a decode worker hosts it, `worker.kv_pairs` forms the pairs).

The prefill and decode workers compose a `WorkerRuntime` and add their request life on top of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from prometheus_client.metrics_core import Metric

from pdserve.config import Faults, KVTransfer
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.request import RequestOutput
from pdserve.kv_transfer.backends import make_connector
from pdserve.kv_transfer.connector import KVConnector, PairedConnector
from pdserve.kv_transfer.rendezvous import Rendezvous
from pdserve.kv_transfer.send_delay import InjectedPause, SendDelay, combined, simulated_wire
from pdserve.registry.entries import Role, WorkerInfo, WorkerState
from pdserve.registry.kv_events import KVEventLog
from pdserve.registry.registry import Registry
from pdserve.worker.cache_events import CacheEventPublisher
from pdserve.worker.engine_thread import EngineThread
from pdserve.worker.heartbeat import Heartbeat
from pdserve.worker.metrics import WorkerMetrics
from pdserve.worker.metrics_server import MetricsServer, serve_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start; built by the control plane, passed to the actor."""

    worker_id: str
    role: Role
    engine: EngineConfig
    """Its pool's engine: the shared `engine:` section with the pool's overrides."""
    kv_transfer: KVTransfer = field(default_factory=KVTransfer)
    redis_url: str | None = None
    """None: no heartbeat and no KV pairing from the registry (a worker in a unit test)."""
    cluster: str = "default"
    namespace: str = "pdserve"
    """The Ray namespace of the cluster's actors (a prefill worker finds its decode peers there)."""
    actor_name: str = ""
    cores: tuple[int, ...] = ()
    """CPU cores to pin the engine's threads to; empty leaves them as they are."""
    host: str = "127.0.0.1"
    """This worker's address for KV pairs; loopback keeps them on this machine (`kv_transfer.rendezvous`); empty:
    the address Ray knows its node by (workers on several machines)."""
    lease_s: float = 30.0
    """A decode worker aborts the requests of a router that has not collected their tokens for this long
    (`router.lease_s`)."""
    faults: Faults = field(default_factory=Faults)


class WorkerRuntime:
    def __init__(self, spec: WorkerSpec, after_step: Callable[[Engine, list[RequestOutput]], None],
                 connector: KVConnector | None = None, thread: EngineThread | None = None) -> None:
        """`thread`: the engine thread of the worker this one was until a role switch in place (its engine, weights
        and KV pool are kept; `leave` let it go); None builds a new engine."""
        self.spec = spec
        self.connector = connector or make_connector(spec.worker_id, spec.kv_transfer.backend,
                                                     checksums=spec.kv_transfer.checksums)
        self.metrics = WorkerMetrics(spec.worker_id, spec.role.value, lambda: self.thread.load,
                                     pairs=self.pair_transports)
        self.metrics_server: MetricsServer | None = None
        self._role_after_step = after_step
        self.cache_events: CacheEventPublisher | None = None
        self.heartbeat: Heartbeat | None = None
        if spec.redis_url is not None:
            registry = Registry(spec.redis_url, spec.cluster)
            self.cache_events = CacheEventPublisher(spec.worker_id, KVEventLog(registry.redis, registry.prefix))
            self.heartbeat = Heartbeat(registry, self.info, self.cache_events)
        self._adopted = thread is not None
        self.thread = thread or EngineThread(lambda: Engine(spec.engine), self._after_step, spec.cores,
                                             name=spec.worker_id, on_step=self.metrics.step)
        self.engine: Engine | None = None
        self.rendezvous = Rendezvous(spec.host or ray.util.get_node_ip_address(), spec.worker_id)
        self.store_address = ""
        """Where KV pairs with this (receiving) worker meet; empty on a sending worker."""
        self.state = WorkerState.STARTING

    async def start(self) -> WorkerInfo:
        if self._adopted:  # from here on the steps are this role's (its object is whole by now)
            await asyncio.wrap_future(self.thread.attach(self._after_step, self.metrics.step))
        self.engine = await asyncio.wrap_future(self.thread.start())
        self.connector.register(self.engine.kv_cache)
        if isinstance(self.connector, PairedConnector):
            self.connector.send_delay = self._send_delay()
            self.connector.model_fingerprint = self.engine.fingerprint
        if self.spec.role is Role.DECODE:
            self.store_address = self.rendezvous.host()
        self.metrics_server = serve_metrics(self.metrics.registry)
        if self.state is not WorkerState.DRAINING:  # a drain asked for while it started stands
            self.state = WorkerState.READY
        if self.heartbeat is not None:
            self.heartbeat.start()
        log.info("worker %s ready (%s, pid %d, cores %s)", self.spec.worker_id, self.spec.role.value, os.getpid(),
                 self.spec.cores)
        return self.info()

    async def connect(self, peer: str, store_address: str, rank: int, generation: int = 0) -> None:
        """Form the KV pair with `peer` (which calls this at the same time with the other rank) at `store_address`
        (the decode worker's rendezvous); `generation` counts the times this pair was formed, so a pair formed again
        after it broke meets under a new name (`worker.kv_pairs` decides when)."""
        if not isinstance(self.connector, PairedConnector):
            return  # in-process connectors need no pairing
        def pair() -> None:  # both block (a TCPStore client waits up to its timeout for its host): off the loop
            store = self.rendezvous.store(store_address, self.connector.pair_name(peer, generation))
            self.connector.connect(peer, store, rank, generation=generation)

        await asyncio.to_thread(pair)
        log.info("worker %s paired with %s (generation %d)", self.spec.worker_id, peer, generation)

    def paired(self) -> set[str]:
        """The workers this one has a working KV pair with now."""
        return set(self.connector.pairs) if isinstance(self.connector, PairedConnector) else set()

    def pair_transports(self) -> dict[str, int]:
        """This worker's KV pairs now, counted by how each moves KV (read on the metrics thread)."""
        if not isinstance(self.connector, PairedConnector):
            return {}
        return dict(Counter(self.connector.transport(peer) for peer in list(self.connector.pairs)))

    async def disconnect(self, peer: str) -> None:
        """Let go of the KV pair with `peer` (it left, or its side of the pair broke); between two steps, as the
        engine thread is the one that starts transfers on it."""
        if isinstance(self.connector, PairedConnector):
            await self.call(lambda _: self.connector.disconnect(peer))

    async def drain(self) -> None:
        """Stop taking new work: the registry says DRAINING at once (written from a thread: a hung Redis must not
        stall this worker's event loop), and routers stop picking this worker."""
        self.state = WorkerState.DRAINING
        if self.heartbeat is not None:
            await asyncio.to_thread(self.heartbeat.beat)

    def call(self, fn: Callable[[Engine], object]) -> asyncio.Future:
        return asyncio.wrap_future(self.thread.call(fn))

    def metric_families(self) -> list[Metric]:
        """This worker's Prometheus metrics now, for the router to serve (`router.worker_scrape`): on a multi-node
        cluster the worker's own port is on its node's loopback only."""
        return list(self.metrics.registry.collect())

    def info(self) -> WorkerInfo:
        load = self.thread.load
        return WorkerInfo(
            worker_id=self.spec.worker_id, role=self.spec.role, actor_name=self.spec.actor_name, pid=os.getpid(),
            state=self.state, store_address=self.store_address,
            running=load.running + load.held if load else 0, waiting=load.waiting if load else 0,
            queued_prefill_tokens=load.queued_prefill_tokens if load else 0,
            kv_blocks_used=load.kv_blocks_used if load else 0, kv_blocks_total=load.kv_blocks_total if load else 0,
            metrics_port=self.metrics_server.port if self.metrics_server else 0,
            prefix_cache_hit_rate=load.cached_tokens_total / load.prompt_tokens_total
            if load and load.prompt_tokens_total else 0.0,
            speculative_acceptance_rate=load.speculative_accepted_total / load.speculative_proposed_total
            if load and load.speculative_proposed_total else 0.0,
            speculative_tokens_per_step=1 + load.speculative_accepted_total / load.speculative_steps_total
            if load and load.speculative_steps_total else 0.0,
            engine_stalled_s=self.thread.stalled_s(),
            paired=tuple(sorted(self.paired())))

    def stop(self) -> None:
        self._unregister()
        self.thread.stop()
        self._close()

    async def leave(self) -> EngineThread:
        """Leave the cluster under this identity (registry entry, KV pairs, metrics port) but keep the engine
        thread and its engine, for a role switch in place; returns the thread."""
        self._unregister()
        await self.call(lambda _: self._close())  # between two steps: nothing polls the connector meanwhile
        return self.thread

    def _after_step(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        """After every engine cycle: the role's own work, then the cache events for the next heartbeat."""
        self._role_after_step(engine, outputs)
        if self.cache_events is not None:
            self.cache_events.add(engine.blocks)

    def _unregister(self) -> None:
        self.state = WorkerState.STOPPED
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def _send_delay(self) -> SendDelay | None:
        """Sends slowed on purpose: a sim engine's modelled wire, an injected pause (`faults`); None otherwise."""
        faults = self.spec.faults
        pause = InjectedPause(faults.kv_send_pause_s, faults.kv_send_pause_count) if faults.kv_send_pause_s else None
        return combined(simulated_wire(self.engine) if self.engine.config.simulated else None, pause)

    def _close(self) -> None:
        self.connector.shutdown()
        self.rendezvous.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()

