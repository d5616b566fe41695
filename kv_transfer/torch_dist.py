"""KV handoff over torch.distributed point-to-point: gloo for CPU tensors, NCCL for CUDA tensors, same code.

Pairs form as workers come and go: each pair of workers gets its own two-rank process group (gloo or NCCL over a
`PrefixStore` of a shared `TCPStore`), with no global `init_process_group`. Both sides call `connect` with the same
store and opposite ranks. A transport error or timeout closes a gloo pair for good, so a transfer that fails so
removes its pair (at the next `poll`); the worker's heartbeat then no longer lists the peer, and the router forms
the pair again under a new generation.

Pairing checks that both sides share a KV layout and model (`kv_transfer.layout`; else `PairRefused` on both). A
transfer moves whole blocks, a group of layers per message: a header first (the tag, the block count and the whole
layout; the receiver checks every field, and gloo takes a message shorter than the receive buffer without complaint),
then one message per layer group `[2, layers_in_group, n, block_size, kv_heads, head_dim]`, then (with checksums on)
the groups' CRC-32s. The sender gathers group g+1 while group g is on the wire; the receiver copies group g into its
blocks while g+1 arrives. This work runs on a small thread pool
(gloo's send/recv work cannot be polled, only waited on); `poll` reports the outcomes on the caller's thread.

Safety: a transfer's gathers and copies run under its lock and stop once it is no longer live, and `cancel` takes
that lock, so after `cancel` (or any reported outcome) no thread touches the transfer's blocks again: the caller can
free them at once. The receiver writes only blocks reserved for the transfer, which the engine leaves alone until
`commit_remote`. gloo cannot abort a posted receive, so the thread of a cancelled transfer stays blocked until that
transfer's timeout (it no longer touches the blocks); `max_concurrent` threads bound how many can wait at once.
Staging tensors are reused (a fresh 90 MiB tensor costs as much in page faults as the copy); a transfer takes them
on its thread, so queued transfers hold none and staging is bounded by `max_concurrent` transfers. Those of a failed
or abandoned transfer may still be written by a late message and are never reused. A transfer's deadline runs from
its submission: one that waited for a thread past it fails (TIMED_OUT) without touching the wire, and its pair, whose
other side is posted, is formed again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer.connector import KVConnector, Transfer, TransferError, TransferResult, TransferStatus
from pdserve.kv_transfer.layout import Corrupted, HeaderMismatch, KVLayout, agree, check_header, checksum
from pdserve.kv_transfer.send_delay import SendDelay

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")


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


class StagingPool:
    """Reusable staging tensors by shape, holding at most `max_bytes` of idle ones."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self.idle: dict[tuple, list[torch.Tensor]] = {}
        self.idle_bytes = 0
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        with self._lock:
            free = self.idle.get((shape, dtype, device))
            if free:
                tensor = free.pop()
                self.idle_bytes -= tensor.numel() * tensor.element_size()
                return tensor
        return torch.empty(shape, dtype=dtype, device=device)

    def give_back(self, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        with self._lock:
            if self.idle_bytes + nbytes <= self.max_bytes:
                self.idle.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(tensor)
                self.idle_bytes += nbytes


PEER_ABORTED = "the sender aborted (no KV)"


class _PeerAborted(Exception):
    """The sender sent a header of zero blocks: the KV will not come (it aborted the request)."""


class _Stopped(Exception):
    """The transfer was cancelled while its thread was still working."""


@dataclass
class _Pair:
    group: dist.ProcessGroup
    peer_rank: int


@dataclass
class _Pending:
    transfer: Transfer
    sending: bool
    staging: list[torch.Tensor]
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    live: bool = True


class TorchDistConnector(KVConnector):
    def __init__(self, worker_id: str, backend: str = "gloo", max_concurrent: int = 16,
                 layers_per_message: int = 5, send_delay: SendDelay | None = None, checksums: bool = False) -> None:
        """`send_delay`: seconds every send waits after its header, by block count. Only simulation and fault
        injection set one (`kv_transfer.send_delay`); a real serving path has none. `checksums`: every transfer
        carries its layer groups' CRC-32s (both sides of a pair must agree)."""
        if backend not in BACKENDS:
            raise TransferError(f"kv_transfer.backend: {backend!r} is not one of {BACKENDS}")
        self.worker_id = worker_id
        self.backend = backend
        self.layers_per_message = layers_per_message
        self.send_delay = send_delay
        self.checksums = checksums
        self.model_fingerprint = ""
        """The model this worker serves (`engine.fingerprint`); a peer with another refuses to pair."""
        self.kv_cache: KVCache | None = None
        self.pairs: dict[str, _Pair] = {}
        self.pending: dict[str, _Pending] = {}
        self._outcomes: queue.SimpleQueue[tuple[str, TransferStatus, str]] = queue.SimpleQueue()
        self._broken: queue.SimpleQueue[tuple[str, _Pair]] = queue.SimpleQueue()
        """Pairs whose transport failed under a transfer (gloo closes a pair on any error or timeout)."""
        self._threads = ThreadPoolExecutor(max_concurrent, thread_name_prefix=f"kv-{worker_id}")
        self._staging = StagingPool()
        self._reported: list[TransferResult] = []

    def pair_name(self, peer: str, generation: int = 0) -> str:
        """The same on both sides: a pair formed again after it broke (a new generation) meets under a new name."""
        return "|".join(sorted((self.worker_id, peer))) + f"|{generation}"

    def connect(self, peer: str, store: dist.Store, rank: int, timeout_s: float = 60.0, generation: int = 0) -> None:
        """Form the two-rank group with `peer`; the peer calls this too, with the same store, the other rank and the
        same `generation`. Raises PairRefused (on both sides) when their KV layouts or models differ."""
        name = self.pair_name(peer, generation)
        agree(dist.PrefixStore(f"pdserve/kv-layout/{name}", store), rank, self.layout(), self.worker_id, peer)
        group = make_pair_group(self.backend, store, name, rank, timeout_s)
        self.pairs[peer] = _Pair(group, peer_rank=1 - rank)

    def register(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache

    def layout(self) -> KVLayout:
        return KVLayout.of(self._cache(), self.layers_per_message, self.checksums, self.model_fingerprint)

    def start_send(self, transfer: Transfer) -> None:
        self._start(transfer, sending=True, work=self._send)

    def start_recv(self, transfer: Transfer) -> None:
        self._start(transfer, sending=False, work=self._receive)

    def poll(self) -> list[TransferResult]:
        self._forget_broken_pairs()
        while True:
            try:
                transfer_id, status, error = self._outcomes.get_nowait()
            except queue.Empty:
                break
            pending = self.pending.pop(transfer_id, None)
            if pending is None:
                continue  # cancelled earlier; already reported
            self._report(pending, status, error)
        reported, self._reported = self._reported, []
        return reported

    def _forget_broken_pairs(self) -> None:
        while True:
            try:
                peer, pair = self._broken.get_nowait()
            except queue.Empty:
                return
            if self.pairs.get(peer) is pair:  # not one formed again since
                del self.pairs[peer]
                log.warning("KV pair %s <-> %s broke; it leaves this worker's heartbeat and is formed again",
                            self.worker_id, peer)

    def cancel(self, transfer_id: str) -> None:
        pending = self.pending.pop(transfer_id, None)
        if pending is not None:
            self._report(pending, TransferStatus.CANCELLED, "cancelled")

    def shutdown(self) -> None:
        for pending in list(self.pending.values()):
            with pending.lock:
                pending.live = False
        self._threads.shutdown(wait=False, cancel_futures=True)
        self.pending.clear()
        self.pairs.clear()

    # ---- on the caller's thread ------------------------------------------------------------------------------
    def _start(self, transfer: Transfer, sending: bool, work) -> None:
        if transfer.transfer_id in self.pending:
            raise TransferError(f"transfer {transfer.transfer_id!r} is already under way")
        pair = self.pairs.get(transfer.peer)
        if pair is None:
            raise TransferError(f"{self.worker_id}: no group with peer {transfer.peer!r}; connect first")
        self._cache()
        pending = _Pending(transfer, sending, [])
        self.pending[transfer.transfer_id] = pending
        self._threads.submit(self._run, pending, pair, work)

    def _report(self, pending: _Pending, status: TransferStatus, error: str) -> None:
        with pending.lock:  # waits for a copy in progress; afterwards no thread touches the blocks
            pending.live = False
        if status is TransferStatus.DONE:
            for tensor in pending.staging:
                self._staging.give_back(tensor)
        else:
            # not back to the pool: the transfer's thread may still be using them (it holds them until it ends)
            expected = status is TransferStatus.CANCELLED or error == PEER_ABORTED  # the request ended, not the link
            level = logging.DEBUG if expected else logging.WARNING
            log.log(level, "KV transfer %s with %s: %s %s", pending.transfer.transfer_id, pending.transfer.peer,
                    status.value, error)
        nbytes = sum(t.numel() * t.element_size() for t in pending.staging) if status is TransferStatus.DONE else 0
        self._reported.append(TransferResult(pending.transfer.transfer_id, status, error,
                                             time.monotonic() - pending.started, nbytes))

    # ---- on a transfer thread --------------------------------------------------------------------------------
    def _run(self, pending: _Pending, pair: _Pair, work) -> None:
        deadline = pending.started + pending.transfer.timeout_s  # from submission: a queued wait counts too
        if time.monotonic() >= deadline:  # its peer's side is posted and will time out: the pair is out of step
            self._broken.put((pending.transfer.peer, pair))
            self._outcomes.put((pending.transfer.transfer_id, TransferStatus.TIMED_OUT,
                                "waited for a transfer thread past its deadline"))
            return
        pending.staging = self._take_staging(len(pending.transfer.block_ids))
        try:
            work(pending, pair, deadline)
        except _Stopped:
            return
        except _PeerAborted:
            self._outcomes.put((pending.transfer.transfer_id, TransferStatus.FAILED, PEER_ABORTED))
        except HeaderMismatch as e:  # the pair's messages are out of step: it must be formed again
            self._broken.put((pending.transfer.peer, pair))
            self._outcomes.put((pending.transfer.transfer_id, TransferStatus.FAILED, f"header: {e}"))
        except Corrupted as e:  # every message arrived, so the pair is still in step: only this transfer fails
            self._outcomes.put((pending.transfer.transfer_id, TransferStatus.FAILED, f"checksum: {e}"))
        except RuntimeError as e:  # the transport failed: the pair is closed, whether the transfer was wanted or not
            self._broken.put((pending.transfer.peer, pair))
            text = str(e).lower()
            status = TransferStatus.TIMED_OUT if "timed out" in text or "timeout" in text else TransferStatus.FAILED
            self._outcomes.put((pending.transfer.transfer_id, status, str(e).splitlines()[0][:300]))
        except Exception as e:  # a bug: reported like a broken link (the pair's state is unknown), never lost
            log.exception("KV transfer %s with %s raised", pending.transfer.transfer_id, pending.transfer.peer)
            self._broken.put((pending.transfer.peer, pair))
            self._outcomes.put((pending.transfer.transfer_id, TransferStatus.FAILED, f"{type(e).__name__}: {e}"[:300]))
        else:
            self._outcomes.put((pending.transfer.transfer_id, TransferStatus.DONE, ""))

    def _send(self, pending: _Pending, pair: _Pair, deadline: float) -> None:
        t = pending.transfer
        index = self._index(t)
        works = [pair.group.send([self._header(t.tag, len(t.block_ids))], pair.peer_rank, t.tag)]
        if not t.block_ids:  # "no KV is coming": ends the receive posted for this tag
            _wait(works[0], deadline)
            return
        if self.send_delay is not None:
            self._pause(pending, self.send_delay(len(t.block_ids)))
        sums = []
        for layers, part in zip(self._layer_groups(), pending.staging):
            with pending.lock:  # cancelled: still send (stale staging) so the receiver's posted recvs complete
                if pending.live:
                    torch.index_select(self._cache().tensor[:, layers], 2, index, out=part)
            if self.checksums:
                sums.append(checksum(part))
            works.append(pair.group.send([part], pair.peer_rank, t.tag))
        if self.checksums:
            works.append(pair.group.send([self._sums_tensor(sums)], pair.peer_rank, t.tag))
        for work in works:
            _wait(work, deadline)

    def _receive(self, pending: _Pending, pair: _Pair, deadline: float) -> None:
        t = pending.transfer
        expected = self._header(t.tag, len(t.block_ids))
        header = torch.empty_like(expected)
        _wait(pair.group.recv([header], pair.peer_rank, t.tag), deadline)
        if t.block_ids and torch.equal(header, self._header(t.tag, 0)):
            raise _PeerAborted
        check_header(header, expected)
        works = [pair.group.recv([part], pair.peer_rank, t.tag) for part in pending.staging]
        sent_sums = self._sums_tensor([0] * len(pending.staging))
        if self.checksums:
            works.append(pair.group.recv([sent_sums], pair.peer_rank, t.tag))
        index, sums = self._index(t), []
        for layers, part, work in zip(self._layer_groups(), pending.staging, works):
            _wait(work, deadline)  # cancelled: still drain the sender's messages, so the pair stays in step
            if self.checksums:
                sums.append(checksum(part))
            with pending.lock:
                if pending.live:
                    self._cache().tensor[:, layers].index_copy_(2, index, part)
        if self.checksums:
            _wait(works[-1], deadline)
        if not pending.live:
            raise _Stopped
        bad = [g for g, (got, sent) in enumerate(zip(sums, sent_sums.tolist())) if got != sent]
        if bad:
            raise Corrupted(f"layer groups {bad} of {len(sums)} arrived with other bytes than were sent")

    def _pause(self, pending: _Pending, seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until and pending.live:
            time.sleep(0.01)

    # ---- shapes ----------------------------------------------------------------------------------------------
    def _take_staging(self, num_blocks: int) -> list[torch.Tensor]:
        """One staging tensor per layer group, taken on the transfer's thread: at most `max_concurrent` transfers
        hold staging at once (queued ones hold none)."""
        cache = self._cache().tensor  # [2, L, blocks, block_size, H_kv, D]
        shapes = [(2, g.stop - g.start, num_blocks, *cache.shape[3:]) for g in self._layer_groups()]
        return [self._staging.take(shape, cache.dtype, cache.device) for shape in shapes]

    def _layer_groups(self) -> list[slice]:
        layers = self._cache().tensor.shape[1]
        return [slice(i, min(i + self.layers_per_message, layers)) for i in range(0, layers, self.layers_per_message)]

    def _index(self, transfer: Transfer) -> torch.Tensor:
        return torch.tensor(transfer.block_ids, dtype=torch.long, device=self._cache().tensor.device)

    def _header(self, tag: int, num_blocks: int) -> torch.Tensor:
        return self.layout().header(tag, num_blocks, self._cache().tensor.device)

    def _sums_tensor(self, sums: list[int]) -> torch.Tensor:
        return torch.tensor(sums, dtype=torch.int64, device=self._cache().tensor.device)

    def _cache(self) -> KVCache:
        if self.kv_cache is None:
            raise TransferError(f"{self.worker_id}: register a KV cache before transferring")
        return self.kv_cache


def _wait(work: dist.Work, deadline: float) -> None:
    work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
