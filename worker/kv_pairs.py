"""The KV pairs of a prefill worker with the decode workers: their whole life, owned by the prefill worker.

A pair is a two-rank process group (`kv_transfer.torch_dist`) that both workers join at once, meeting at the decode
worker's rendezvous (the `store_address` in its registry entry) under a name that counts the times this pair was
formed (its generation). Every PAIR_CHECK_S the keeper reads the registry and

- forms a pair with each ready decode worker it has none with: it joins its own side while the decode worker's
  actor joins the other (`connect`), both at once;
- forms again a pair that broke: a transfer that failed on the wire closed it here (the connector drops it), or the
  decode worker's heartbeat has not listed this worker for PAIR_SETTLE_S since the pair formed (its side broke);
- lets go of the pair with a decode worker missing from the registry for GONE_S (a restarted Redis fills up again
  within a heartbeat, so a short absence does not count);
- while Redis is away, asks the cluster's worker actors through Ray instead (`worker.directory`), so a decode worker
  that started meanwhile (a replacement) is paired at once;
- never pairs again with a decode worker that refused the pair (`PairRefused`: another model or KV layout; logged
  once, naming what differs): routers then never send a request between the two.

It also carries this worker's announcements of KV sends (`KVAnnouncement`) to their decode workers. Routers form no
pairs: they send a request only through a pair that both workers' heartbeats list.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import redis

from pdserve.kv_transfer.layout import PairRefused
from pdserve.registry.entries import Role, WorkerInfo, WorkerState
from pdserve.registry.registry import Registry
from pdserve.worker.directory import ask_workers
from pdserve.worker.messages import FirstToken, KVAnnouncement
from pdserve.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

PAIR_CHECK_S = 1.0
PAIR_SETTLE_S = 3.0
"""A pair younger than this is not judged by the decode worker's heartbeat (one sent before it formed lacks it)."""
GONE_S = 10.0
CONNECT_TIMEOUT_S = 60.0


@dataclass
class _Peer:
    """A decode worker this prefill worker pairs with."""

    info: WorkerInfo
    handle: Any
    """Its actor handle (`connect`, `announce`)."""
    generation: int = -1
    formed_at: float | None = None
    """When the pair last formed (loop time); None while it is not formed."""
    missing_since: float | None = None
    """Since when the registry lacks it."""
    refused: str = ""
    """Why it cannot pair with this worker (their KV layouts differ); never tried again."""


class PairKeeper:
    def __init__(self, runtime: WorkerRuntime, registry: Registry,
                 find_actor: Callable[[str], Any] | None = None) -> None:
        """`find_actor(name)`: a decode worker's actor handle by its actor name (Ray's named actors by default)."""
        self.runtime = runtime
        self.registry = registry
        self.find_actor = find_actor or (lambda name: ray.get_actor(name, namespace=runtime.spec.namespace))
        self.peers: dict[str, _Peer] = {}
        self._forming: dict[str, asyncio.Task] = {}
        self._sends: set[asyncio.Task] = set()
        self._redis_failing = False

    @property
    def worker_id(self) -> str:
        return self.runtime.spec.worker_id

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(PAIR_CHECK_S)

    async def check(self) -> None:
        listed = await self._decode_workers()
        if listed is None:
            return  # neither Redis nor Ray answered: keep the pairs there are; look again next time
        infos = {i.worker_id: i for i in listed if i.role is Role.DECODE}
        now = asyncio.get_running_loop().time()
        for worker_id, peer in list(self.peers.items()):
            if worker_id in infos:
                peer.info, peer.missing_since = infos[worker_id], None
            elif peer.missing_since is None:
                peer.missing_since = now
            elif now - peer.missing_since > GONE_S:
                await self._let_go(worker_id, "it left the registry")
        for info in infos.values():
            if info.worker_id not in self.peers and info.state is WorkerState.READY:
                await self._meet(info)
        for worker_id, peer in self.peers.items():
            if worker_id not in self._forming and self._needs_forming(peer, now):
                self._forming[worker_id] = asyncio.create_task(self._form(peer), name=f"pair-{worker_id}")

    async def _decode_workers(self) -> list[WorkerInfo] | None:
        """The workers in the registry, or (Redis away) those Ray knows, as they answer themselves."""
        try:
            listed = await asyncio.to_thread(self.registry.workers)
            self._redis_failing = False
            return listed
        except redis.RedisError as e:
            if not self._redis_failing:
                log.warning("%s: registry unreadable (%s); finding decode workers through Ray", self.worker_id, e)
            self._redis_failing = True
        spec = self.runtime.spec
        try:
            found = await ask_workers(spec.namespace, spec.cluster,
                                      {p.info.actor_name: p.handle for p in self.peers.values()})
        except (ray.exceptions.RayError, RuntimeError) as e:  # Ray not initialised here, or its GCS away
            log.warning("%s: Ray does not list the workers either: %s", self.worker_id, e)
            return None
        return [info for info, _ in found.values()]

    def announce(self, decode_worker: str, announcement: KVAnnouncement | FirstToken) -> None:
        """Tell the decode worker that a send to it started, or (streamed) the first token that followed it (on the
        event loop; the answer is not waited for)."""
        peer = self.peers.get(decode_worker)
        if peer is None:  # it left: the send times out and frees the blocks
            log.warning("%s: KV of %s goes to %s, which is not a peer", self.worker_id, announcement.request_id,
                        decode_worker)
            return
        task = asyncio.ensure_future(self._announce(peer, announcement))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def close(self) -> None:
        tasks = [*self._forming.values(), *self._sends]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- the pair's life -------------------------------------------------------------------------------------
    def _needs_forming(self, peer: _Peer, now: float) -> bool:
        if peer.refused:
            return False
        if peer.missing_since is not None or (peer.formed_at is None and peer.info.state is not WorkerState.READY):
            return False  # never a new pair with a worker that is leaving; an old one lasts until it breaks
        if peer.formed_at is None:
            return True
        if peer.info.worker_id not in self.runtime.paired():
            log.warning("KV pair %s -> %s broke here; forming it again", self.worker_id, peer.info.worker_id)
            return True
        if self.worker_id not in peer.info.paired and now - peer.formed_at > PAIR_SETTLE_S:
            log.warning("KV pair %s -> %s broke on the decode side; forming it again", self.worker_id,
                        peer.info.worker_id)
            return True
        return False

    async def _meet(self, info: WorkerInfo) -> None:
        try:
            handle = await asyncio.to_thread(self.find_actor, info.actor_name)
        except ValueError:  # registered, but its actor is gone (it is dying)
            log.info("%s: decode worker %s has no actor %r", self.worker_id, info.worker_id, info.actor_name)
            return
        self.peers[info.worker_id] = _Peer(info, handle)

    async def _form(self, peer: _Peer) -> None:
        worker_id = peer.info.worker_id
        peer.generation += 1
        peer.formed_at = None
        store = peer.info.store_address
        try:
            both = await asyncio.wait_for(asyncio.gather(
                self.runtime.connect(worker_id, store, 0, peer.generation),
                peer.handle.connect.remote(self.worker_id, store, 1, peer.generation), return_exceptions=True),
                CONNECT_TIMEOUT_S)
            refusal = next((e for e in both if isinstance(e, PairRefused)), None)
            if refusal is not None:  # both sides compared the same two layouts: neither holds the pair
                peer.refused = str(refusal)
                log.error("%s; this pair is never tried again", refusal)
                await self.runtime.disconnect(worker_id)
                return
            failure = next((e for e in both if isinstance(e, BaseException)), None)
            if failure is not None:
                raise failure
            peer.formed_at = asyncio.get_running_loop().time()
            log.info("KV pair %s -> %s formed (generation %d)", self.worker_id, worker_id, peer.generation)
        except (ray.exceptions.RayError, TimeoutError, RuntimeError, OSError) as e:  # tried again next check
            log.warning("KV pair %s -> %s could not form: %s", self.worker_id, worker_id, e)
        finally:
            self._forming.pop(worker_id, None)

    async def _let_go(self, worker_id: str, reason: str) -> None:
        log.info("KV pair %s -> %s let go: %s", self.worker_id, worker_id, reason)
        self.peers.pop(worker_id, None)
        task = self._forming.pop(worker_id, None)
        if task is not None:
            task.cancel()
        await self.runtime.disconnect(worker_id)

    async def _announce(self, peer: _Peer, message: KVAnnouncement | FirstToken) -> None:
        try:
            if isinstance(message, FirstToken):
                await peer.handle.first_token.remote(message)
            else:
                await peer.handle.announce.remote(message)
        except ray.exceptions.RayError as e:  # the decode worker died: the send times out and frees the blocks
            log.warning("announcing the KV of %s to %s failed: %s", message.request_id, peer.info.worker_id,
                        type(e).__name__)
