"""KV handoff over torch.distributed point-to-point: gloo for CPU tensors, NCCL for CUDA tensors, same code.

Pairs form as workers come and go: each pair of workers gets its own two-rank process group (gloo or NCCL over a
`PrefixStore` of a shared `TCPStore`), with no global `init_process_group`. Both sides call `connect` with the same
store and opposite ranks; it checks that both share a KV layout and model (`kv_transfer.layout`; else `PairRefused`
on both), then warms the group up with one small message each way (NCCL builds its communicator then, not on the
first request). Each pair is one ordered `Channel` (`kv_transfer.channel`: the message order, and why it is correct
for a transport that ignores tags).

A transfer's blocks are read and written in place: no gather on the sender, no scatter on the receiver where its
blocks are consecutive. So a transfer whose messages are on the wire is reported only once they end, whatever the
caller asked: after `cancel`, free the blocks when `poll` reports the transfer (at once while it still waits its
turn; at the latest by its deadline). Transfers still waiting when their deadline passes are reported TIMED_OUT by
`poll`, and their KV is discarded when it comes.

A transport error or timeout breaks a pair (gloo closes it for good; NCCL's communicator is aborted): the pair is
dropped at the next `poll`, the transfers waiting on it fail, the worker's heartbeat no longer lists the peer, and the
router forms the pair again under a new generation.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer.channel import PEER_ABORTED, Arrival, Channel, Pending, Phase
from pdserve.kv_transfer.connector import PairedConnector, Transfer, TransferError, TransferResult, TransferStatus
from pdserve.kv_transfer.layout import KVLayout, agree
from pdserve.kv_transfer.send_delay import SendDelay
from pdserve.kv_transfer.staging import StagingPool
from pdserve.kv_transfer.streams import TransferStreams

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
ARRIVAL_KEEP_S = 60.0
"""How long KV that arrived before its receive was posted is kept, and how long a given-up receive's tag is
remembered so that its KV is dropped when it comes."""

GIVEN_UP = {TransferStatus.CANCELLED: "cancelled", TransferStatus.TIMED_OUT: "not done by its deadline",
            TransferStatus.FAILED: "the pair broke"}
"""Why a transfer the connector gave up on ended."""


def make_pair_group(backend: str, store: dist.Store, name: str, rank: int, timeout_s: float) -> dist.ProcessGroup:
    """A two-rank process group named `name` on `store`; blocks until the other rank joins."""
    prefixed = dist.PrefixStore(f"pdserve/kv/{name}", store)
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, 2, options)
    raise TransferError(f"kv_transfer.backend: {backend!r} is not one of {BACKENDS}")


class TorchDistConnector(PairedConnector):
    streams_layers = True  # the wire sends layer by layer (`kv_transfer.wire`)

    def __init__(self, worker_id: str, backend: str = "gloo", send_delay: SendDelay | None = None,
                 checksums: bool = False) -> None:
        """`send_delay`: seconds every send waits after its header, by block count. Only simulation and fault
        injection set one (`kv_transfer.send_delay`); a real serving path has none. `checksums`: every transfer
        carries its layers' CRC-32s (both sides of a pair must agree)."""
        if backend not in BACKENDS:
            raise TransferError(f"kv_transfer.backend: {backend!r} is not one of {BACKENDS}")
        super().__init__(worker_id)
        self.backend = backend
        self.send_delay = send_delay
        self.checksums = checksums
        self.kv_cache: KVCache | None = None
        self.streams = TransferStreams()
        self.staging = StagingPool()
        self.pairs: dict[str, Channel] = {}
        self.pending: dict[str, Pending] = {}
        self._lock = threading.Lock()
        """Guards the three tables below, which the read threads share with the caller's thread."""
        self._receiving: dict[tuple[str, int], Pending] = {}
        self._arrived: dict[tuple[str, int], tuple[float, Arrival]] = {}
        self._dropped: dict[tuple[str, int], float] = {}
        self._outcomes: queue.SimpleQueue[tuple[Pending, TransferStatus, str, int]] = queue.SimpleQueue()
        self._broken: queue.SimpleQueue[Channel] = queue.SimpleQueue()

    @property
    def layout(self) -> KVLayout:
        return KVLayout.of(self._cache(), self.checksums, self.model_fingerprint)

    def connect(self, peer: str, store: dist.Store, rank: int, timeout_s: float = 60.0, generation: int = 0) -> None:
        name = self.pair_name(peer, generation)
        agree(dist.PrefixStore(f"pdserve/kv-layout/{name}", store), rank, self.layout, self.worker_id, peer)
        group = make_pair_group(self.backend, store, name, rank, timeout_s)
        warm_up(group, 1 - rank, self._cache().tensor.device, timeout_s)
        self.add_pair(peer, group, 1 - rank)

    def add_pair(self, peer: str, group, peer_rank: int) -> None:
        """Use `group` (formed and warmed up) for the pair with `peer`; replaces a pair formed before."""
        old = self.pairs.pop(peer, None)
        if old is not None:
            old.close()
        self.pairs[peer] = Channel(self, peer, group, peer_rank)

    def disconnect(self, peer: str) -> None:
        channel = self.pairs.pop(peer, None)
        if channel is not None:
            channel.close()

    def transport(self, peer: str) -> str:
        return self.backend

    def register(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache
        self.streams = TransferStreams.of(kv_cache.tensor.device)

    def start_send(self, transfer: Transfer) -> None:
        channel = self._start(transfer)
        pending = Pending(transfer, sending=True, after=self.streams.mark())
        self.pending[transfer.transfer_id] = pending
        channel.submit_send(pending)

    def start_recv(self, transfer: Transfer) -> None:
        channel = self._start(transfer)
        pending = Pending(transfer, sending=False)
        self.pending[transfer.transfer_id] = pending
        key = (transfer.peer, transfer.tag)
        with self._lock:
            kept = self._arrived.pop(key, None)
            if kept is None:
                self._receiving[key] = pending
        channel.submit_read(pending.deadline)  # one read for every posted receive, even one whose KV is here
        if kept is not None:
            pending.claim()
            self._apply(pending, kept[1])

    def poll(self) -> list[TransferResult]:
        self._forget_broken_pairs()
        self._expire()
        reported = []
        while True:
            try:
                pending, status, error, nbytes = self._outcomes.get_nowait()
            except queue.Empty:
                return reported
            if self.pending.get(pending.transfer.transfer_id) is pending:  # not reported before
                del self.pending[pending.transfer.transfer_id]
                reported.append(self._result(pending, status, error, nbytes))

    def cancel(self, transfer_id: str) -> None:
        pending = self.pending.get(transfer_id)
        if pending is not None:
            self._give_up(pending, TransferStatus.CANCELLED)

    def discard(self, peer: str, tag: int) -> None:
        channel = self.pairs.get(peer)
        if channel is None or channel.broken:
            raise TransferError(f"{self.worker_id}: no group with peer {peer!r}")
        key = (peer, tag)
        with self._lock:
            kept = self._arrived.pop(key, None)
            if kept is None:
                self._dropped[key] = time.monotonic() + ARRIVAL_KEEP_S  # read into staging when it comes, dropped
        channel.submit_read(time.monotonic() + ARRIVAL_KEEP_S)  # one read for every announced transfer, as always
        if kept is not None and kept[1].staging is not None:
            self.staging.give_back(kept[1].staging)

    def shutdown(self) -> None:
        for pending in list(self.pending.values()):
            pending.give_up(TransferStatus.CANCELLED)
        for channel in self.pairs.values():
            channel.close()
        self.pending.clear()
        self.pairs.clear()

    # ---- what the channels call (on their threads) -----------------------------------------------------------
    def cache_tensor(self) -> torch.Tensor:
        return self._cache().tensor

    def claim_receive(self, peer: str, tag: int) -> Pending | None:
        """The receive posted for the transfer whose header just arrived, now on the wire; None if there is none
        (the KV came first, or its receive was given up)."""
        with self._lock:
            pending = self._receiving.pop((peer, tag), None)
            if pending is not None and pending.claim():
                return pending
        return None

    def keep_arrival(self, peer: str, tag: int, arrival: Arrival) -> None:
        """KV read with no receive to write into: drop it if its receive was given up, else keep it until its
        receive is posted (or one was posted while it was being read: apply it now)."""
        key = (peer, tag)
        with self._lock:
            dropped = self._dropped.pop(key, None) is not None
            pending = None if dropped else self._receiving.pop(key, None)
            if not dropped and pending is None:
                self._arrived[key] = (time.monotonic() + ARRIVAL_KEEP_S, arrival)
                return
        if pending is not None and pending.claim():
            self._apply(pending, arrival)
        elif arrival.staging is not None:
            self.staging.give_back(arrival.staging)

    def finish(self, pending: Pending, status: TransferStatus, error: str = "", nbytes: int = 0) -> None:
        """A transfer's outcome, reported at the next poll (a transfer given up meanwhile ends as it was given up)."""
        with pending.lock:
            given_up = pending.given_up
        if given_up is not None:
            status, error, nbytes = given_up, GIVEN_UP[given_up], 0
        self._outcomes.put((pending, status, error, nbytes))

    def broke(self, channel: Channel) -> None:
        self._broken.put(channel)

    # ---- on the caller's thread ------------------------------------------------------------------------------
    def _start(self, transfer: Transfer) -> Channel:
        if transfer.transfer_id in self.pending:
            raise TransferError(f"transfer {transfer.transfer_id!r} is already under way")
        channel = self.pairs.get(transfer.peer)
        if channel is None or channel.broken:
            raise TransferError(f"{self.worker_id}: no group with peer {transfer.peer!r}; connect first")
        self._cache()
        return channel

    def _apply(self, pending: Pending, arrival: Arrival) -> None:
        """Finish a receive from KV that arrived before it (on whichever thread found the two)."""
        blocks = pending.transfer.block_ids
        if arrival.error or arrival.blocks != len(blocks):
            self.finish(pending, TransferStatus.FAILED, arrival.error or f"sent {arrival.blocks} blocks, expected "
                                                                         f"{len(blocks)}")
        else:
            index = torch.tensor(blocks, dtype=torch.long, device=self.cache_tensor().device)
            self.cache_tensor().index_copy_(2, index, arrival.staging)  # [2, L, n, ...] into [2, L, blocks, ...]
            self.finish(pending, TransferStatus.DONE, nbytes=arrival.staging.numel() * arrival.staging.element_size())
        if arrival.staging is not None:
            self.staging.give_back(arrival.staging)

    def _give_up(self, pending: Pending, status: TransferStatus) -> None:
        if not pending.sending:
            key = (pending.transfer.peer, pending.transfer.tag)
            with self._lock:
                if self._receiving.get(key) is pending:
                    del self._receiving[key]
                    self._dropped[key] = time.monotonic() + ARRIVAL_KEEP_S
        if pending.give_up(status):  # nothing of it is on the wire: report it now
            self.finish(pending, status)

    def _expire(self) -> None:
        now = time.monotonic()
        for pending in list(self.pending.values()):
            if pending.phase is Phase.WAITING and now >= pending.deadline:
                self._give_up(pending, TransferStatus.TIMED_OUT)
        with self._lock:
            for key in [k for k, (until, _) in self._arrived.items() if until <= now]:
                del self._arrived[key]
            for key in [k for k, until in self._dropped.items() if until <= now]:
                del self._dropped[key]

    def _forget_broken_pairs(self) -> None:
        while True:
            try:
                channel = self._broken.get_nowait()
            except queue.Empty:
                return
            if self.pairs.get(channel.peer) is channel:  # not one formed again since
                del self.pairs[channel.peer]
                channel.close()
                log.warning("KV pair %s <-> %s broke; it leaves this worker's heartbeat and is formed again",
                            self.worker_id, channel.peer)
            for pending in list(self.pending.values()):
                if pending.transfer.peer == channel.peer and pending.phase is Phase.WAITING:
                    self._give_up(pending, TransferStatus.FAILED)

    def _result(self, pending: Pending, status: TransferStatus, error: str, nbytes: int) -> TransferResult:
        t = pending.transfer
        if status is not TransferStatus.DONE:
            expected = status is TransferStatus.CANCELLED or error == PEER_ABORTED  # the request ended, not the link
            log.log(logging.DEBUG if expected else logging.WARNING, "KV transfer %s with %s: %s %s",
                    t.transfer_id, t.peer, status.value, error)
        return TransferResult(t.transfer_id, status, error, time.monotonic() - pending.started, nbytes)

    def _cache(self) -> KVCache:
        if self.kv_cache is None:
            raise TransferError(f"{self.worker_id}: register a KV cache before transferring")
        return self.kv_cache


def warm_up(group, peer_rank: int, device: torch.device, timeout_s: float) -> None:
    """One small message each way, so a new pair's transport (NCCL's communicator) is built now, not on the first
    request. Both ranks call it."""
    ping = torch.ones(1, device=device)
    first, second = (group.send, group.recv) if peer_rank == 1 else (group.recv, group.send)
    first([ping], peer_rank, 0).wait(timedelta(seconds=timeout_s))
    second([ping], peer_rank, 0).wait(timedelta(seconds=timeout_s))
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # not the whole device: it would fail a CUDA graph capture
