"""KV handoff between two workers on one node (`kv_transfer.backend: ipc`, or `auto` for same-node pairs): the
receiver copies the sender's blocks straight from the sender's cache, mapped into its own process, into its own
blocks. On GPUs that is CUDA IPC, a device-to-device copy with no host round trip (a prefill and a decode worker
sharing one GPU, `gpus: 0.5` each, included); on CPUs a memory copy out of shared memory. No socket carries KV.

At `register` the worker's cache becomes shareable (`shared_cache.share`; on CPU its storage moves into /dev/shm).
At pairing both sides check each other's KV layout and node, map each other's cache (`shared_cache.open_shared`),
say whether that worked (either failing refuses the pair on both sides, naming why), and open the pair's notice line
(`notice_line`). The protocol is `one_sided`'s; here a notice is a line on that socket and a READ is one copy per run
of blocks consecutive on both sides, all layers at once: on CPU on a copy thread of its own (the engine thread only
starts it and polls it), on a CUDA cache on the transfer stream, done when its event is.

A peer whose notice line closes (it disconnected, or its process died) leaves this worker's pairs (so its heartbeat
no longer lists it and the router forms the pair again); its transfers end by their deadlines as the protocol says,
as one of them may still be reading.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer import notice_line
from pdserve.kv_transfer.connector import TransferError
from pdserve.kv_transfer.layout import PairRefused, agree
from pdserve.kv_transfer.notice_line import LineBroken, NoticeLine, ProcessId, WrongPeer
from pdserve.kv_transfer.one_sided import OneSidedConnector, ReadState, Receive, common_runs
from pdserve.kv_transfer.shared_cache import node_id, open_shared, share

log = logging.getLogger(__name__)


class IpcUnavailable(PairRefused):
    """The two workers cannot pair over IPC (other nodes, a cache that cannot be mapped); raised on both sides, so
    `backend: auto` pairs them over the network instead."""


@dataclass
class _Peer:
    cache: torch.Tensor
    """The peer's KV cache, mapped into this process: [2, L, its blocks, BS, H_kv, D]."""
    line: NoticeLine


class IpcConnector(OneSidedConnector):
    def __init__(self, worker_id: str) -> None:
        super().__init__(worker_id)
        self.pairs: dict[str, _Peer] = {}
        self.node = node_id()
        """The machine this worker runs on, as its peers compare it (`shared_cache.node_id`)."""
        self._shared: dict | None = None
        """What a peer needs to map this worker's cache (`shared_cache.share`)."""
        self._copier: ThreadPoolExecutor | None = None

    def register(self, kv_cache: KVCache) -> None:
        """Raises TransferError if the cache cannot be shared (no room in /dev/shm, a device it cannot be on)."""
        self._shared = share(kv_cache.tensor)
        super().register(kv_cache)
        if kv_cache.tensor.device.type == "cpu":
            self._copier = ThreadPoolExecutor(1, thread_name_prefix=f"kv-ipc-{self.worker_id}")

    def connect(self, peer: str, store: dist.Store, rank: int, timeout_s: float = 60.0, generation: int = 0) -> None:
        name = self.pair_name(peer, generation)
        agree(dist.PrefixStore(f"pdserve/ipc-layout/{name}", store), rank, self.layout, self.worker_id, peer)
        pair_store = dist.PrefixStore(f"pdserve/ipc/{name}", store)
        pair_store.set(f"cache/{rank}", json.dumps({"node": self.node, "cache": self._shared,
                                                    "process": notice_line.me().to_json()}))
        theirs = json.loads(pair_store.get(f"cache/{1 - rank}"))
        cache, problem = self._map(theirs)
        pair_store.set(f"mapped/{rank}", json.dumps(problem))  # "" if it worked
        problem = problem or json.loads(pair_store.get(f"mapped/{1 - rank}"))
        if problem:
            raise IpcUnavailable(f"KV pair {self.worker_id} <-> {peer} cannot use ipc: {problem}")
        line = self._open_line(pair_store, rank, timeout_s, ProcessId.from_json(theirs["process"]))
        self.disconnect(peer)
        self.pairs[peer] = _Peer(cache, line)

    @staticmethod
    def _open_line(pair_store: dist.Store, rank: int, timeout_s: float, peer: ProcessId) -> NoticeLine:
        """The pair's notice line: rank 0 listens, rank 1 dials; each end checks the other is the peer's process."""
        if rank == 0:
            listener, address = notice_line.listen()
            pair_store.set("line", address)
            return notice_line.accept(listener, timeout_s, peer)
        try:
            return notice_line.dial(pair_store.get("line").decode(), timeout_s, peer)
        except WrongPeer as e:
            raise TransferError(f"the KV pair's notice line is not its peer's: {e}") from e

    def disconnect(self, peer: str) -> None:
        """Let go of the pair; a READ still copying from the peer's cache keeps it mapped until it ends."""
        old = self.pairs.pop(peer, None)
        if old is not None:
            old.line.close()

    def transport(self, peer: str) -> str:
        return "ipc"

    def shutdown(self) -> None:
        super().shutdown()
        if self._copier is not None:
            self._copier.shutdown(wait=True)  # no copy outlives the caches it reads and writes

    def _map(self, theirs: dict) -> tuple[torch.Tensor | None, str]:
        """The peer's cache mapped here, or why it cannot be."""
        if theirs["node"] != self.node:
            return None, f"the workers are on different nodes ({self.node} here, {theirs['node']} at the peer)"
        try:
            return open_shared(theirs["cache"]), ""
        except TransferError as e:
            return None, str(e)

    # ---- the transport -----------------------------------------------------------------------------------------
    def _notify(self, peer: str, notice: dict) -> None:
        pair = self.pairs.get(peer)
        if pair is None:
            return
        try:
            pair.line.send(notice)
        except LineBroken as e:
            self._forget(peer, str(e))

    def _new_notices(self) -> list[tuple[str, dict]]:
        notices = []
        for peer, pair in list(self.pairs.items()):
            notices += [(peer, notice) for notice in pair.line.receive()]
            if pair.line.closed:
                self._forget(peer, "its notice line closed")
        return notices

    def _begin_read(self, receive: Receive) -> Any:
        t = receive.transfer
        pair = self.pairs.get(t.peer)
        if pair is None:
            raise TransferError(f"the pair with {t.peer} is gone")
        mine, theirs = self._cache().tensor, pair.cache  # [2, L, blocks, BS, H_kv, D] each
        runs = [(t.block_ids[first], receive.source[first], count)
                for first, count in common_runs(t.block_ids, receive.source)]

        def copy() -> None:
            for to, source, count in runs:
                mine[:, :, to:to + count].copy_(theirs[:, :, source:source + count], non_blocking=True)

        if self._copier is not None:
            return self._copier.submit(copy)
        with self._streams.receiving():
            copy()
            done = torch.cuda.Event()
            done.record()
        return done

    def _read_state(self, handle: Any) -> tuple[ReadState, str]:
        if isinstance(handle, Future):
            if not handle.done():
                return ReadState.MOVING, ""
            error = handle.exception()
            return (ReadState.FAILED, f"the copy failed: {error}") if error else (ReadState.DONE, "")
        return (ReadState.DONE, "") if handle.query() else (ReadState.MOVING, "")

    def _read_done(self, receive: Receive) -> None:
        self._notify(receive.transfer.peer, {"op": "done", "tag": receive.transfer.tag})

    def _forget(self, peer: str, why: str) -> None:
        if peer in self.pairs:
            log.warning("KV pair %s <-> %s broke (%s); it leaves this worker's heartbeat and is formed again",
                        self.worker_id, peer, why)
            self.disconnect(peer)
            self._pair_broke(peer)
