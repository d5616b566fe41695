"""KV handoff over NIXL, the transfer library NVIDIA Dynamo, vLLM and SGLang share (`kv_transfer.backend: nixl`;
`pip install 'pdserve[nixl]'`). UCX underneath picks the wire: shared memory or CMA on one host, TCP or RDMA
across hosts; CUDA memory where the cache lives on a GPU.

Each worker registers its whole KV cache with its NIXL agent once. At pairing both workers put their agent's
metadata and their cache's address and size in the pair's store and check each other's KV layout
(`kv_transfer.layout`). A transfer is a one-sided READ by the receiver, straight from the sender's blocks into its
own, one descriptor per (K or V, layer, run of blocks consecutive on both sides); nothing is staged, and nothing
depends on message order: every notification names its transfer's tag.

The life of a transfer:

    sender:   start_send -> notification "send": its tag, block ids and how long it waits ---------+
                 (its blocks stay readable)                                                          |
              <- "done" (the READ's own notification) -> DONE; or "dropped" -> CANCELLED            |
    receiver: start_recv, and the "send" notification (whichever comes second) -> READ <-----------+
              -> READ complete -> DONE

A receive still waiting for its "send" past its deadline is TIMED_OUT, and one cancelled then is CANCELLED: both
tell the sender "dropped", as does a receive that expected another block count (FAILED). A READ in flight is
reported only when it ends. The receiver never starts a READ after the sender stops waiting, and fails one that ends
later than that (the sender may have freed the blocks): the sender waits its own timeout plus `READ_GRACE_S` for an
answer before it gives up (TIMED_OUT) and frees them. A send of no blocks is "no KV": the receive FAILS with
`PEER_ABORTED` and the sender is DONE at once. Everything runs in `poll`, on the caller's thread, which also drives
UCX's progress (no progress thread spinning beside the engine).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer.channel import PEER_ABORTED
from pdserve.kv_transfer.connector import PairedConnector, Transfer, TransferError, TransferResult, TransferStatus
from pdserve.kv_transfer.layout import KVLayout, agree

log = logging.getLogger(__name__)

READ_GRACE_S = 5.0
"""How long past its own deadline a sender keeps its blocks readable for a READ that started in time."""
NOTICE_KEEP_S = 60.0
"""How long a "send" notification waits for its receive to be posted (one given up first never is)."""
NOTICE_MARGIN_S = 1.0
"""How much earlier than the sender's announced limit a receiver stops starting and accepting READs (the
notification's own delay, and clock steps)."""


def load_nixl() -> Any:
    """NIXL's Python API, or a TransferError saying how to install it."""
    try:
        return importlib.import_module("nixl._api")
    except ImportError as e:
        raise TransferError("kv_transfer.backend: nixl needs the nixl package (pip install 'pdserve[nixl]')") from e


@dataclass(frozen=True)
class _Peer:
    name: str
    base: int
    """Its KV cache's address, in its process."""
    num_blocks: int


@dataclass
class _Send:
    transfer: Transfer
    started: float
    notice_at: float
    """When its "send" notification goes out: at once, unless a send delay (simulation, fault injection) holds it."""
    noticed: bool = False
    cancelled: bool = False


@dataclass
class _Receive:
    transfer: Transfer
    started: float
    source: tuple[int, ...] | None = None
    """The sender's block ids, once its "send" notification came."""
    read_by: float = 0.0
    """When the sender stops waiting (on this clock, less NOTICE_MARGIN_S): no READ may start or end after."""
    handle: Any = None
    cancelled: TransferStatus | None = None


class NixlConnector(PairedConnector):
    def __init__(self, worker_id: str) -> None:
        super().__init__(worker_id)
        self._api = load_nixl()
        # no progress thread: UCX's would spin on a core the engine needs (2.5x slower handoffs on the dev box);
        # transfers progress in `poll`, which the worker calls after every step
        config = self._api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
        self._agent = self._api.nixl_agent(worker_id, config)
        self.kv_cache: KVCache | None = None
        self.pairs: dict[str, _Peer] = {}
        self._registered: Any = None
        self._sends: dict[str, _Send] = {}
        self._receives: dict[str, _Receive] = {}
        self._notices: dict[tuple[str, int], tuple[float, dict]] = {}
        """"send" notifications whose receive is not posted yet, by (peer, tag)."""
        self._reported: list[TransferResult] = []

    @property
    def layout(self) -> KVLayout:
        return KVLayout.of(self._cache(), False, self.model_fingerprint)

    def register(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache
        self._registered = self._agent.register_memory(kv_cache.tensor)

    def connect(self, peer: str, store: dist.Store, rank: int, timeout_s: float = 60.0, generation: int = 0) -> None:
        name = self.pair_name(peer, generation)
        agree(dist.PrefixStore(f"pdserve/kv-layout/{name}", store), rank, self.layout, self.worker_id, peer)
        pair_store = dist.PrefixStore(f"pdserve/nixl/{name}", store)
        cache = self._cache().tensor
        pair_store.set(f"agent/{rank}", self._agent.get_agent_metadata())
        pair_store.set(f"cache/{rank}", json.dumps({"base": cache.data_ptr(), "num_blocks": cache.shape[2]}))
        if peer in self.pairs:
            self._agent.remove_remote_agent(peer)
        remote = self._agent.add_remote_agent(pair_store.get(f"agent/{1 - rank}"))
        geometry = json.loads(pair_store.get(f"cache/{1 - rank}"))
        self.pairs[peer] = _Peer(remote.decode() if isinstance(remote, bytes) else remote, geometry["base"],
                                 geometry["num_blocks"])

    def disconnect(self, peer: str) -> None:
        if self.pairs.pop(peer, None) is not None:
            self._agent.remove_remote_agent(peer)

    def start_send(self, transfer: Transfer) -> None:
        self._check_new(transfer)
        now = time.monotonic()
        delay = self.send_delay(len(transfer.block_ids)) if self.send_delay is not None else 0.0
        self._sends[transfer.transfer_id] = _Send(transfer, now, now + delay)
        if not transfer.block_ids:  # "no KV": nothing to read, nothing to wait for
            self._notify_send(self._sends[transfer.transfer_id])
            self._report_send(transfer.transfer_id, TransferStatus.DONE)

    def start_recv(self, transfer: Transfer) -> None:
        self._check_new(transfer)
        receive = _Receive(transfer, time.monotonic())
        self._receives[transfer.transfer_id] = receive
        kept = self._notices.pop((transfer.peer, transfer.tag), None)
        if kept is not None:
            self._noticed(receive, kept[1])

    def poll(self) -> list[TransferResult]:
        self._read_notifications()
        now = time.monotonic()
        for send in list(self._sends.values()):
            self._advance_send(send, now)
        for receive in list(self._receives.values()):
            self._advance_receive(receive, now)
        for key in [key for key, (until, _) in self._notices.items() if until <= now]:
            del self._notices[key]
        reported, self._reported = self._reported, []
        return reported

    def cancel(self, transfer_id: str) -> None:
        if transfer_id in self._sends:
            self._sends[transfer_id].cancelled = True  # its peer may be reading: reported once it answers
        elif transfer_id in self._receives:
            self._give_up(self._receives[transfer_id], TransferStatus.CANCELLED)

    def shutdown(self) -> None:
        for receive in self._receives.values():
            if receive.handle is not None:
                self._agent.release_xfer_handle(receive.handle)
        self._sends.clear()
        self._receives.clear()
        for peer in list(self.pairs):
            self.disconnect(peer)
        if self._registered is not None:
            self._agent.deregister_memory(self._registered)
            self._registered = None

    # ---- sends -----------------------------------------------------------------------------------------------
    def _advance_send(self, send: _Send, now: float) -> None:
        t = send.transfer
        ready = t.progress is None or t.progress.complete  # (it does not stream: `streams_layers` is false)
        if not send.noticed and now >= send.notice_at and ready:
            self._notify_send(send)
        if now >= send.started + t.timeout_s + READ_GRACE_S:
            self._report_send(t.transfer_id, TransferStatus.CANCELLED if send.cancelled else TransferStatus.TIMED_OUT,
                              "no answer from the receiver")

    def _notify_send(self, send: _Send) -> None:
        t = send.transfer
        waits = t.timeout_s - (time.monotonic() - send.started)
        self._notify(t.peer, {"op": "send", "tag": t.tag, "blocks": list(t.block_ids), "waits_s": waits})
        send.noticed = True

    def _answered(self, peer: str, notice: dict) -> None:
        send = next((s for s in self._sends.values() if s.transfer.peer == peer and s.transfer.tag == notice["tag"]),
                    None)
        if send is None:
            return
        if notice["op"] == "done":
            status = TransferStatus.CANCELLED if send.cancelled else TransferStatus.DONE
            self._report_send(send.transfer.transfer_id, status, nbytes=self._bytes(len(send.transfer.block_ids)))
        else:
            self._report_send(send.transfer.transfer_id, TransferStatus.CANCELLED, "the receiver dropped it")

    def _report_send(self, transfer_id: str, status: TransferStatus, error: str = "", nbytes: int = 0) -> None:
        send = self._sends.pop(transfer_id)
        self._reported.append(TransferResult(transfer_id, status, error, time.monotonic() - send.started, nbytes))

    # ---- receives --------------------------------------------------------------------------------------------
    def _noticed(self, receive: _Receive, notice: dict) -> None:
        receive.source = tuple(notice["blocks"])
        receive.read_by = time.monotonic() + notice["waits_s"] + READ_GRACE_S - NOTICE_MARGIN_S
        t = receive.transfer
        if not receive.source and t.block_ids:
            self._finish_receive(receive, TransferStatus.FAILED, PEER_ABORTED)
        elif len(receive.source) != len(t.block_ids):
            self._drop(receive, TransferStatus.FAILED, f"sent {len(receive.source)} blocks, expected "
                                                       f"{len(t.block_ids)}")
        elif receive.cancelled is None:
            self._start_read(receive)

    def _start_read(self, receive: _Receive) -> None:
        t, peer = receive.transfer, self.pairs[receive.transfer.peer]
        if time.monotonic() >= receive.read_by - READ_GRACE_S:
            self._drop(receive, TransferStatus.TIMED_OUT, "the sender's wait ended before the read could start")
            return
        local, remote = self._descriptors(t.block_ids, receive.source, peer)
        kind = "VRAM" if self._cache().tensor.device.type == "cuda" else "DRAM"
        receive.handle = self._agent.initialize_xfer(
            "READ", self._agent.get_xfer_descs(local, kind), self._agent.get_xfer_descs(remote, kind), peer.name,
            json.dumps({"op": "done", "tag": t.tag}).encode())
        if self._agent.transfer(receive.handle) == "ERR":
            self._end_read(receive, TransferStatus.FAILED, "NIXL refused the read")

    def _advance_receive(self, receive: _Receive, now: float) -> None:
        t = receive.transfer
        if receive.handle is None:
            if receive.cancelled is None and now >= receive.started + t.timeout_s:
                self._give_up(receive, TransferStatus.TIMED_OUT)
            return
        state = self._agent.check_xfer_state(receive.handle)
        if state == "PROC":
            return
        if state != "DONE":
            self._end_read(receive, TransferStatus.FAILED, f"NIXL read ended {state}")
        elif now > receive.read_by:
            self._end_read(receive, TransferStatus.FAILED, "the read ended after the sender may have freed its blocks")
        else:
            self._end_read(receive, receive.cancelled or TransferStatus.DONE, nbytes=self._bytes(len(t.block_ids)))

    def _give_up(self, receive: _Receive, status: TransferStatus) -> None:
        receive.cancelled = status
        if receive.handle is None:  # nothing reads into its blocks: report it now
            self._drop(receive, status, "cancelled" if status is TransferStatus.CANCELLED else "no KV in time")

    def _drop(self, receive: _Receive, status: TransferStatus, error: str) -> None:
        """End a receive that will not read, and tell its sender (once it has heard of it) not to wait."""
        self._notify(receive.transfer.peer, {"op": "dropped", "tag": receive.transfer.tag})
        self._finish_receive(receive, status, error)

    def _end_read(self, receive: _Receive, status: TransferStatus, error: str = "", nbytes: int = 0) -> None:
        self._agent.release_xfer_handle(receive.handle)
        receive.handle = None
        self._finish_receive(receive, status, error, nbytes)

    def _finish_receive(self, receive: _Receive, status: TransferStatus, error: str = "", nbytes: int = 0) -> None:
        t = self._receives.pop(receive.transfer.transfer_id).transfer
        if status is not TransferStatus.DONE and status is not TransferStatus.CANCELLED:
            log.warning("KV transfer %s from %s: %s %s", t.transfer_id, t.peer, status.value, error)
        self._reported.append(TransferResult(t.transfer_id, status, error, time.monotonic() - receive.started,
                                             nbytes))

    # ---- notifications and descriptors -----------------------------------------------------------------------
    def _read_notifications(self) -> None:
        for peer, messages in self._agent.get_new_notifs().items():
            for message in messages:
                notice = json.loads(message)
                if notice["op"] == "send":
                    receive = next((r for r in self._receives.values()
                                    if r.transfer.peer == peer and r.transfer.tag == notice["tag"]), None)
                    if receive is None:
                        self._notices[(peer, notice["tag"])] = (time.monotonic() + NOTICE_KEEP_S, notice)
                    elif receive.source is None:
                        self._noticed(receive, notice)
                else:
                    self._answered(peer, notice)

    def _notify(self, peer: str, notice: dict) -> None:
        if peer in self.pairs:
            self._agent.send_notif(self.pairs[peer].name, json.dumps(notice).encode())

    def _descriptors(self, local_ids: tuple[int, ...], remote_ids: tuple[int, ...],
                     peer: _Peer) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """(address, bytes, device) per (K or V, layer, run of blocks consecutive on both sides), both lists in one
        order."""
        cache = self._cache().tensor  # [2, L, blocks, block_size, H_kv, D]
        layers, mine = cache.shape[1], cache.shape[2]
        block = cache[0, 0, 0].numel() * cache.element_size()
        device = cache.device.index or 0
        local, remote = [], []
        for first, count in _common_runs(local_ids, remote_ids):
            for kv in (0, 1):
                for layer in range(layers):
                    row = kv * layers + layer
                    local.append((cache.data_ptr() + (row * mine + local_ids[first]) * block, count * block, device))
                    remote.append((peer.base + (row * peer.num_blocks + remote_ids[first]) * block, count * block,
                                   device))
        return local, remote

    def _check_new(self, transfer: Transfer) -> None:
        if transfer.transfer_id in self._sends or transfer.transfer_id in self._receives:
            raise TransferError(f"transfer {transfer.transfer_id!r} is already under way")
        if transfer.peer not in self.pairs:
            raise TransferError(f"{self.worker_id}: no pair with peer {transfer.peer!r}; connect first")
        self._cache()

    def _bytes(self, blocks: int) -> int:
        cache = self._cache().tensor
        return blocks * cache[:, :, 0].numel() * cache.element_size()

    def _cache(self) -> KVCache:
        if self.kv_cache is None:
            raise TransferError(f"{self.worker_id}: register a KV cache before transferring")
        return self.kv_cache


def _common_runs(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[int, int]]:
    """(first position, count) of the runs where both `a` and `b` hold consecutive ids."""
    runs, first = [], 0
    for i in range(1, len(a) + 1):
        if i == len(a) or a[i] != a[i - 1] + 1 or b[i] != b[i - 1] + 1:
            runs.append((first, i - first))
            first = i
    return runs if a else []

