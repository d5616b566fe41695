"""KV handoff by one-sided reads: the receiver copies the sender's blocks straight into its own, and the two sides
tell each other by short notices what to read and when they are done. The protocol is here; a transport says how
notices travel and how a read is done: NIXL over UCX (`nixl_connector`), or a plain copy from the peer's cache
mapped into this process on the same node (`ipc_connector`). Nothing is staged, and nothing depends on message
order: every notice names its transfer's tag.

The life of a transfer:

    sender:   start_send -> notice "send": its tag, block ids and how long it waits ---------------+
                 (its blocks stay readable)                                                          |
              <- "done" -> DONE; or "dropped" -> CANCELLED                                           |
    receiver: start_recv, and the "send" notice (whichever comes second) -> READ <------------------+
              -> READ complete -> DONE (and "done" to the sender)

A receive still waiting for its "send" past its deadline is TIMED_OUT, and one cancelled then is CANCELLED: both
tell the sender "dropped", as does a receive that expected another block count (FAILED). A READ in flight is
reported only when it ends. The receiver never starts a READ after the sender stops waiting, and fails one that ends
later than that (the sender may have freed the blocks): the sender waits its own timeout plus `READ_GRACE_S` for an
answer before it gives up (TIMED_OUT) and frees them. A send of no blocks is "no KV": the receive FAILS with
`PEER_ABORTED` and the sender is DONE at once. Everything runs in `poll`, on the caller's thread (a transport may
run its reads elsewhere and report them done in `poll`).
"""

from __future__ import annotations

import abc
import enum
import logging
import time
from dataclasses import dataclass
from typing import Any

from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer.channel import PEER_ABORTED
from pdserve.kv_transfer.connector import PairedConnector, Transfer, TransferError, TransferResult, TransferStatus
from pdserve.kv_transfer.layout import KVLayout
from pdserve.kv_transfer.streams import TransferStreams

log = logging.getLogger(__name__)

READ_GRACE_S = 5.0
"""How long past its own deadline a sender keeps its blocks readable for a READ that started in time."""
NOTICE_KEEP_S = 60.0
"""How long a "send" notice waits for its receive to be posted (one given up first never is)."""
NOTICE_MARGIN_S = 1.0
"""How much earlier than the sender's announced limit a receiver stops starting and accepting READs (the notice's
own delay, and clock steps)."""


class ReadState(enum.Enum):
    MOVING = "moving"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Send:
    transfer: Transfer
    started: float
    notice_at: float
    """When its "send" notice goes out: at once, unless a send delay (simulation, fault injection) holds it."""
    after: object | None = None
    """On a CUDA cache: the point on the engine's stream its blocks were written by; noticed once it is passed."""
    noticed: bool = False
    cancelled: bool = False


@dataclass
class Receive:
    transfer: Transfer
    started: float
    source: tuple[int, ...] | None = None
    """The sender's block ids, once its "send" notice came."""
    read_by: float = 0.0
    """When the sender stops waiting (on this clock, less NOTICE_MARGIN_S): no READ may start or end after."""
    handle: Any = None
    """The transport's READ in flight."""
    cancelled: TransferStatus | None = None


class OneSidedConnector(PairedConnector):
    """The protocol; a subclass adds pairing (`connect`, `disconnect`) and the transport hooks below."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(worker_id)
        self.kv_cache: KVCache | None = None
        self._streams = TransferStreams()
        self._sends: dict[str, Send] = {}
        self._receives: dict[str, Receive] = {}
        self._notices: dict[tuple[str, int], tuple[float, dict]] = {}
        """"send" notices whose receive is not posted yet, by (peer, tag)."""
        self._discarding: dict[tuple[str, int], float] = {}
        """(peer, tag) of transfers to answer "dropped" when their "send" notice comes, until when."""
        self._reported: list[TransferResult] = []

    # ---- the transport -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _notify(self, peer: str, notice: dict) -> None:
        """Send `notice` to `peer` (dropped if the pair is gone)."""

    @abc.abstractmethod
    def _new_notices(self) -> list[tuple[str, dict]]:
        """(peer, notice) for every notice that came since the last call."""

    @abc.abstractmethod
    def _begin_read(self, receive: Receive) -> Any:
        """Start copying the sender's blocks (`receive.source`) into `receive.transfer.block_ids`; returns the READ's
        handle, or raises TransferError if the transport refuses it."""

    @abc.abstractmethod
    def _read_state(self, handle: Any) -> tuple[ReadState, str]:
        """Where the READ stands, and why it failed if it did."""

    def _release_read(self, handle: Any) -> None:
        """Let go of a READ's handle (it ended, or the connector shuts down)."""

    def _read_done(self, receive: Receive) -> None:
        """A READ completed (in time or not): a transport whose READs do not tell the sender themselves does here."""

    # ---- the connector -----------------------------------------------------------------------------------------
    @property
    def layout(self) -> KVLayout:
        return KVLayout.of(self._cache(), False, self.model_fingerprint)

    def register(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache
        self._streams = TransferStreams.of(kv_cache.tensor.device)

    def start_send(self, transfer: Transfer) -> None:
        self._check_new(transfer)
        now = time.monotonic()
        delay = self.send_delay(len(transfer.block_ids)) if self.send_delay is not None else 0.0
        self._sends[transfer.transfer_id] = Send(transfer, now, now + delay, after=self._streams.mark())
        if not transfer.block_ids:  # "no KV": nothing to read, nothing to wait for
            self._notify_send(self._sends[transfer.transfer_id])
            self._report_send(transfer.transfer_id, TransferStatus.DONE)

    def start_recv(self, transfer: Transfer) -> None:
        self._check_new(transfer)
        receive = Receive(transfer, time.monotonic())
        self._receives[transfer.transfer_id] = receive
        kept = self._notices.pop((transfer.peer, transfer.tag), None)
        if kept is not None:
            self._noticed(receive, kept[1])

    def poll(self) -> list[TransferResult]:
        self._read_notices()
        now = time.monotonic()
        for send in list(self._sends.values()):
            self._advance_send(send, now)
        for receive in list(self._receives.values()):
            self._advance_receive(receive, now)
        for key in [key for key, (until, _) in self._notices.items() if until <= now]:
            del self._notices[key]
        for key in [key for key, until in self._discarding.items() if until <= now]:
            del self._discarding[key]
        reported, self._reported = self._reported, []
        return reported

    def cancel(self, transfer_id: str) -> None:
        if transfer_id in self._sends:
            self._sends[transfer_id].cancelled = True  # its peer may be reading: reported once it answers
        elif transfer_id in self._receives:
            self._give_up(self._receives[transfer_id], TransferStatus.CANCELLED)

    def discard(self, peer: str, tag: int) -> None:
        if peer not in self.pairs:
            raise TransferError(f"{self.worker_id}: no pair with peer {peer!r}")
        if self._notices.pop((peer, tag), None) is not None:
            self._notify(peer, {"op": "dropped", "tag": tag})
        else:
            self._discarding[(peer, tag)] = time.monotonic() + NOTICE_KEEP_S

    def shutdown(self) -> None:
        for receive in self._receives.values():
            if receive.handle is not None:
                self._release_read(receive.handle)
        self._sends.clear()
        self._receives.clear()
        for peer in list(self.pairs):
            self.disconnect(peer)

    # ---- sends -------------------------------------------------------------------------------------------------
    def _advance_send(self, send: Send, now: float) -> None:
        t = send.transfer
        ready = t.progress is None or t.progress.complete  # (it does not stream: `streams_layers` is false)
        written = send.after is None or send.after.query()  # a CUDA event: the engine's stream wrote the blocks
        if not send.noticed and now >= send.notice_at and ready and written:
            self._notify_send(send)
        if now >= send.started + t.timeout_s + READ_GRACE_S:
            self._report_send(t.transfer_id, TransferStatus.CANCELLED if send.cancelled else TransferStatus.TIMED_OUT,
                              "no answer from the receiver")

    def _notify_send(self, send: Send) -> None:
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

    # ---- receives ----------------------------------------------------------------------------------------------
    def _noticed(self, receive: Receive, notice: dict) -> None:
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

    def _start_read(self, receive: Receive) -> None:
        if time.monotonic() >= receive.read_by - READ_GRACE_S:
            self._drop(receive, TransferStatus.TIMED_OUT, "the sender's wait ended before the read could start")
            return
        try:
            receive.handle = self._begin_read(receive)
        except TransferError as e:
            self._drop(receive, TransferStatus.FAILED, str(e))

    def _advance_receive(self, receive: Receive, now: float) -> None:
        t = receive.transfer
        if receive.handle is None:
            if receive.cancelled is None and now >= receive.started + t.timeout_s:
                self._give_up(receive, TransferStatus.TIMED_OUT)
            return
        state, error = self._read_state(receive.handle)
        if state is ReadState.MOVING:
            return
        if state is ReadState.FAILED:
            self._end_read(receive, TransferStatus.FAILED, error)
            return
        self._read_done(receive)
        if now > receive.read_by:
            self._end_read(receive, TransferStatus.FAILED, "the read ended after the sender may have freed its blocks")
        else:
            self._end_read(receive, receive.cancelled or TransferStatus.DONE, nbytes=self._bytes(len(t.block_ids)))

    def _give_up(self, receive: Receive, status: TransferStatus) -> None:
        receive.cancelled = status
        if receive.handle is None:  # nothing reads into its blocks: report it now
            self._drop(receive, status, "cancelled" if status is TransferStatus.CANCELLED else "no KV in time")

    def _drop(self, receive: Receive, status: TransferStatus, error: str) -> None:
        """End a receive that will not read, and tell its sender (once it has heard of it) not to wait."""
        self._notify(receive.transfer.peer, {"op": "dropped", "tag": receive.transfer.tag})
        self._finish_receive(receive, status, error)

    def _end_read(self, receive: Receive, status: TransferStatus, error: str = "", nbytes: int = 0) -> None:
        self._release_read(receive.handle)
        receive.handle = None
        self._finish_receive(receive, status, error, nbytes)

    def _finish_receive(self, receive: Receive, status: TransferStatus, error: str = "", nbytes: int = 0) -> None:
        t = self._receives.pop(receive.transfer.transfer_id).transfer
        if status is not TransferStatus.DONE and status is not TransferStatus.CANCELLED:
            log.warning("KV transfer %s from %s: %s %s", t.transfer_id, t.peer, status.value, error)
        self._reported.append(TransferResult(t.transfer_id, status, error, time.monotonic() - receive.started,
                                             nbytes))

    def _pair_broke(self, peer: str) -> None:
        """Fail at once what a broken pair can no longer finish: receives whose "send" notice has not come, sends not
        announced yet. A send announced may still be read by the peer: it ends by its deadline, as always."""
        for receive in [r for r in self._receives.values() if r.transfer.peer == peer and r.source is None]:
            self._finish_receive(receive, TransferStatus.FAILED, "the pair broke")
        for send in [s for s in self._sends.values() if s.transfer.peer == peer and not s.noticed]:
            self._report_send(send.transfer.transfer_id, TransferStatus.FAILED, "the pair broke")

    # ---- notices -----------------------------------------------------------------------------------------------
    def _read_notices(self) -> None:
        for peer, notice in self._new_notices():
            if notice["op"] != "send":
                self._answered(peer, notice)
                continue
            receive = next((r for r in self._receives.values()
                            if r.transfer.peer == peer and r.transfer.tag == notice["tag"]), None)
            if receive is None and self._discarding.pop((peer, notice["tag"]), None) is not None:
                self._notify(peer, {"op": "dropped", "tag": notice["tag"]})
            elif receive is None:
                self._notices[(peer, notice["tag"])] = (time.monotonic() + NOTICE_KEEP_S, notice)
            elif receive.source is None:
                self._noticed(receive, notice)

    def _check_new(self, transfer: Transfer) -> None:
        if transfer.transfer_id in self._sends or transfer.transfer_id in self._receives:
            raise TransferError(f"transfer {transfer.transfer_id!r} is already under way")
        if transfer.peer not in self.pairs:
            raise TransferError(f"{self.worker_id}: no pair with peer {transfer.peer!r}; connect first")
        self._cache()

    def _bytes(self, blocks: int) -> int:
        return blocks * self._cache().block_bytes

    def _cache(self) -> KVCache:
        if self.kv_cache is None:
            raise TransferError(f"{self.worker_id}: register a KV cache before transferring")
        return self.kv_cache


def common_runs(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[int, int]]:
    """(first position, count) of the runs where both `a` and `b` hold consecutive ids."""
    runs, first = [], 0
    for i in range(1, len(a) + 1):
        if i == len(a) or a[i] != a[i - 1] + 1 or b[i] != b[i - 1] + 1:
            runs.append((first, i - first))
            first = i
    return runs if a else []
