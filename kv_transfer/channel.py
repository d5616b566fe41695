"""One ordered channel per pair of workers: the thread that sends this worker's transfers to the peer, one after
another, and the thread that reads the peer's transfers to this worker, in the order they come.

The life of a send: `start_send` -> queued on the pair's send thread (WAITING) -> its turn: the header, the piece
lengths, then every layer's messages straight from the cache (MOVING) -> all sent -> reported. The life of a receive:
`start_recv` -> registered under its tag (WAITING), and one read queued on the pair's read thread -> that read takes
the next transfer off the wire, whatever its tag, and hands it to the receive registered under the tag in its header
(MOVING: written straight into the blocks where they are consecutive) -> reported. A transfer the header names but
nobody waits for yet arrived early: it is kept in staging until its receive is posted; one whose receive was given up
(cancelled, timed out) is read into staging and dropped. Each posted receive queues exactly one read, and each posted
receive stands for a send that has started (the prefill worker announces a send after starting it), so reads and
sends pair one to one and the channel never waits for a transfer that is not coming.

A sender whose transfer was given up before its turn still sends its header, with no blocks ("no KV"), so the read
queued for it still has a transfer to take; the receiver's transfer ends FAILED with `PEER_ABORTED`.

Failures: a transport error or timeout breaks the channel (gloo closes a pair on either; an NCCL communicator is
aborted): its group is aborted, transfers waiting on it fail, and the connector forms the pair again. A header whose
layout differs breaks it too (the stream is out of step). A checksum mismatch or a wrong block count fails only that
transfer: every message was still read, so the channel stays in step.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from pdserve.kv_transfer.connector import Transfer, TransferStatus
from pdserve.kv_transfer.layout import HEADER_FIELDS, HeaderMismatch, KVLayout, check_header
from pdserve.kv_transfer.send_delay import SendDelay
from pdserve.kv_transfer.staging import StagingPool
from pdserve.kv_transfer.streams import TransferStreams
from pdserve.kv_transfer.wire import Piece, crc, is_run, layer_messages, pieces_of, sender_pieces

log = logging.getLogger(__name__)

PEER_ABORTED = "the sender aborted (no KV)"
NO_KV_WAIT_S = 5.0
"""How long a "no KV" header of a transfer given up may wait for the peer to read it."""
HEADER_GRACE_S = 5.0
"""How long past its receive's deadline a read waits for the next header before it calls the pair broken. A sender
gives a transfer up by the same deadline (counted from before the receive was posted) and then sends "no KV", so a
header later than this means the peer or the link is gone; a late one is discarded, and the pair stays in step."""


class Phase(enum.Enum):
    WAITING = "waiting"
    """Posted; none of its messages is on the wire, so nothing touches its blocks."""
    MOVING = "moving"
    """Its messages are on the wire: its blocks are being read (send) or written (receive)."""


@dataclass
class Pending:
    """One transfer as the connector tracks it, from `start_*` until it is reported."""

    transfer: Transfer
    sending: bool
    started: float = field(default_factory=time.monotonic)
    after: object | None = None
    """Sends on a CUDA cache: the point on the engine's stream its blocks were written by."""
    phase: Phase = Phase.WAITING
    given_up: TransferStatus | None = None
    """CANCELLED or TIMED_OUT once the caller no longer wants it."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def deadline(self) -> float:
        return self.started + self.transfer.timeout_s

    def claim(self) -> bool:
        """Put it on the wire; False if it was given up first."""
        with self.lock:
            if self.given_up is not None:
                return False
            self.phase = Phase.MOVING
            return True

    def give_up(self, status: TransferStatus) -> bool:
        """The caller no longer wants it. True: report it now (nothing touches its blocks); False: its messages are
        on the wire, and its thread reports it once they end."""
        with self.lock:
            if self.given_up is None:
                self.given_up = status
            return self.phase is Phase.WAITING


@dataclass(frozen=True)
class Arrival:
    """A transfer read off the wire with no receive to write it into: all of it in `staging` ([2, L, n, ...])."""

    blocks: int
    staging: torch.Tensor | None
    error: str = ""


class ChannelOwner(Protocol):
    """What a channel needs from its connector."""

    layout: KVLayout
    checksums: bool
    send_delay: SendDelay | None
    staging: StagingPool
    streams: TransferStreams

    def cache_tensor(self) -> torch.Tensor: ...

    def claim_receive(self, peer: str, tag: int) -> Pending | None: ...

    def keep_arrival(self, peer: str, tag: int, arrival: Arrival) -> None: ...

    def finish(self, pending: Pending, status: TransferStatus, error: str = "", nbytes: int = 0) -> None: ...

    def broke(self, channel: Channel) -> None: ...


class Channel:
    def __init__(self, owner: ChannelOwner, peer: str, group: dist.ProcessGroup, peer_rank: int) -> None:
        self.owner, self.peer, self.group, self.peer_rank = owner, peer, group, peer_rank
        self.broken = False
        self._sends = ThreadPoolExecutor(1, thread_name_prefix=f"kv-send-{peer}")
        self._reads = ThreadPoolExecutor(1, thread_name_prefix=f"kv-read-{peer}")

    def submit_send(self, pending: Pending) -> None:
        self._sends.submit(self._send_safely, pending)

    def submit_read(self, deadline: float) -> None:
        self._reads.submit(self._read_safely, deadline)

    def close(self) -> None:
        self._sends.shutdown(wait=False, cancel_futures=True)
        self._reads.shutdown(wait=False, cancel_futures=True)

    def break_off(self) -> None:
        """Abort the group: posted messages fail (where the backend can), and the pair must be formed again."""
        if self.broken:
            return
        self.broken = True
        abort = getattr(self.group, "abort", None)
        if abort is not None:
            try:
                abort()
            except RuntimeError as e:  # a group already torn down by its own error
                log.debug("aborting the KV group with %s: %s", self.peer, e)
        self.owner.broke(self)

    # ---- the send thread --------------------------------------------------------------------------------------
    def _send_safely(self, pending: Pending) -> None:
        if self.broken:
            self.owner.finish(pending, TransferStatus.FAILED, "the pair broke before its turn")
            return
        try:
            self._send(pending)
        except Exception as e:  # the transport failed, or a bug: the channel's state is unknown either way
            self._fail(pending, e)

    def _send(self, pending: Pending) -> None:
        t = pending.transfer
        if not pending.claim() or time.monotonic() >= pending.deadline:
            self._wait(self._post_send(self._header(t.tag, 0, 0)), time.monotonic() + NO_KV_WAIT_S)
            self.owner.finish(pending, TransferStatus.TIMED_OUT, "waited for its turn on the pair past its deadline")
            return  # (a transfer given up before its turn was reported then; finish ignores it)
        cache = self.owner.cache_tensor()  # [2, L, blocks, block_size, H_kv, D]
        pieces, gathering = sender_pieces(t.block_ids)
        with self.owner.streams.sending(after=pending.after):
            works = [self._post_send(self._header(t.tag, len(t.block_ids), len(pieces)))]
            if t.block_ids:
                works.append(self._post_send(self._lengths(pieces, cache.device)))
                if self.owner.send_delay is not None:
                    self._pause(pending, self.owner.send_delay(len(t.block_ids)))
                works += self._send_layers(cache, t, pieces, gathering, pending.deadline)
            for work in works:
                self._wait(work, pending.deadline)
            self.owner.streams.settle(pending.deadline)
        self.owner.finish(pending, TransferStatus.DONE, nbytes=_kv_bytes(cache, len(t.block_ids)))

    def _send_layers(self, cache: torch.Tensor, transfer: Transfer, pieces: list[Piece], gathering: bool,
                     deadline: float) -> list:
        """Post every layer's messages, each layer once it is computed (`transfer.progress`, when streaming)."""
        block_ids = transfer.block_ids
        source, index = cache, None
        if gathering:  # one piece: the blocks gathered layer by layer, each while the previous layer is on the wire
            source = self.owner.staging.take((2, cache.shape[1], len(block_ids), *cache.shape[3:]), cache.dtype,
                                             cache.device)
            index = torch.tensor(block_ids, dtype=torch.long, device=cache.device)
        works, sums, running = [], [], 0
        for layer, kv, piece in layer_messages(cache.shape[1], pieces):
            if transfer.progress is not None and kv == 0 and piece is pieces[0]:
                self.owner.streams.follow(transfer.progress.wait(layer, deadline))
            if gathering and kv == 0:
                for side in (0, 1):
                    torch.index_select(cache[side, layer], 0, index, out=source[side, layer])
            first = piece.position if gathering else block_ids[piece.position]
            message = source[kv, layer, first:first + piece.length]  # [n, block_size, H_kv, D], contiguous
            if self.owner.checksums:
                running = crc(message, running)
                if kv == 1 and piece is pieces[-1]:
                    sums.append(running)
                    running = 0
            works.append(self._post_send(message))
        if self.owner.checksums:
            works.append(self._post_send(torch.tensor(sums, dtype=torch.int64, device=cache.device)))
        return works  # the gathered staging is not given back: the group may still hold it after a failure

    def _pause(self, pending: Pending, seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until and pending.given_up is None:
            time.sleep(0.01)

    # ---- the read thread --------------------------------------------------------------------------------------
    def _read_safely(self, deadline: float) -> None:
        if self.broken:
            return
        target: list[Pending] = []
        try:
            self._read(deadline, target)
        except Exception as e:  # the transport failed, or a bug: the channel's state is unknown either way
            self._fail(target[0] if target else None, e)

    def _read(self, job_deadline: float, target_out: list[Pending]) -> None:
        cache = self.owner.cache_tensor()  # [2, L, blocks, block_size, H_kv, D]
        with self.owner.streams.receiving():
            header = torch.empty(len(HEADER_FIELDS), dtype=torch.int64, device=cache.device)
            self._wait(self._post_recv(header), job_deadline + HEADER_GRACE_S)
            self.owner.streams.settle(job_deadline + HEADER_GRACE_S)
            tag, blocks, piece_count = check_header(header.cpu(), self.owner.layout)
            target = self.owner.claim_receive(self.peer, tag)
            if target is not None:
                target_out.append(target)
            if blocks == 0:
                self._end_read(target, tag, Arrival(0, None, PEER_ABORTED))
                return
            deadline = target.deadline if target is not None else job_deadline
            lengths = torch.empty(piece_count, dtype=torch.int64, device=cache.device)
            self._wait(self._post_recv(lengths), deadline)
            self.owner.streams.settle(deadline)
            pieces = pieces_of(lengths.tolist())
            expected = len(target.transfer.block_ids) if target is not None else blocks
            into = target.transfer.block_ids if target is not None and expected == blocks else None
            staging, error = self._read_layers(cache, blocks, pieces, into, deadline)
            self.owner.streams.settle(deadline)
        if expected != blocks:
            error = f"sent {blocks} blocks, expected {expected}"
        self._end_read(target, tag, Arrival(blocks, staging if into is None else None, error))
        if into is not None and staging is not None:
            self.owner.staging.give_back(staging)

    def _read_layers(self, cache: torch.Tensor, blocks: int, pieces: list[Piece], into: tuple[int, ...] | None,
                     deadline: float) -> tuple[torch.Tensor | None, str]:
        """Receive every layer: straight into the cache where `into`'s blocks for a piece are consecutive, else
        into staging (copied into `into`'s blocks layer by layer). `into` None: all of it into staging."""
        direct = {p.position: into is not None and is_run(into[p.position:p.position + p.length]) for p in pieces}
        staging = None
        if not all(direct.values()):
            staging = self.owner.staging.take((2, cache.shape[1], blocks, *cache.shape[3:]), cache.dtype,
                                              cache.device)
        messages, works = [], []
        for layer, kv, piece in layer_messages(cache.shape[1], pieces):
            if direct[piece.position]:
                first = into[piece.position]
                message = cache[kv, layer, first:first + piece.length]
            else:
                message = staging[kv, layer, piece.position:piece.position + piece.length]
            messages.append(message)
            works.append(self._post_recv(message))
        sent_sums = torch.zeros(cache.shape[1], dtype=torch.int64, device=cache.device)
        if self.owner.checksums:
            works.append(self._post_recv(sent_sums))
        per_layer, sums = 2 * len(pieces), []
        for layer in range(cache.shape[1]):
            for work in works[layer * per_layer:(layer + 1) * per_layer]:
                self._wait(work, deadline)
            if into is not None and staging is not None:
                self._copy_staged(cache, staging, layer, pieces, direct, into)
            if self.owner.checksums:
                running = 0
                for message in messages[layer * per_layer:(layer + 1) * per_layer]:
                    running = crc(message, running)
                sums.append(running)
        if self.owner.checksums:
            self._wait(works[-1], deadline)
            bad = [layer for layer, (got, sent) in enumerate(zip(sums, sent_sums.tolist())) if got != sent]
            if bad:
                return staging, f"checksum: layers {bad} of {len(sums)} arrived with other bytes than were sent"
        return staging, ""

    @staticmethod
    def _copy_staged(cache: torch.Tensor, staging: torch.Tensor, layer: int, pieces: list[Piece],
                     direct: dict[int, bool], into: tuple[int, ...]) -> None:
        for piece in pieces:
            if direct[piece.position]:
                continue
            span = slice(piece.position, piece.position + piece.length)
            index = torch.tensor(into[span], dtype=torch.long, device=cache.device)
            for kv in (0, 1):
                cache[kv, layer].index_copy_(0, index, staging[kv, layer, span])

    def _end_read(self, target: Pending | None, tag: int, arrival: Arrival) -> None:
        if target is None:
            self.owner.keep_arrival(self.peer, tag, arrival)
            return
        if arrival.staging is not None:
            self.owner.staging.give_back(arrival.staging)
        if arrival.error:
            self.owner.finish(target, TransferStatus.FAILED, arrival.error)
            return
        self.owner.finish(target, TransferStatus.DONE, nbytes=_kv_bytes(self.owner.cache_tensor(), arrival.blocks))

    # ---- both ------------------------------------------------------------------------------------------------
    def _fail(self, pending: Pending | None, error: Exception) -> None:
        if not isinstance(error, (RuntimeError, HeaderMismatch)):
            log.exception("KV channel with %s raised", self.peer, exc_info=error)
        self.break_off()
        if pending is not None:
            late = time.monotonic() >= pending.deadline
            status = TransferStatus.TIMED_OUT if late else TransferStatus.FAILED
            text = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
            if not isinstance(error, (RuntimeError, HeaderMismatch)):
                text = f"{type(error).__name__}: {text}"
            self.owner.finish(pending, status, text)

    def _header(self, tag: int, blocks: int, pieces: int) -> torch.Tensor:
        return self.owner.layout.header(tag, blocks, pieces, self.owner.cache_tensor().device)

    @staticmethod
    def _lengths(pieces: list[Piece], device: torch.device) -> torch.Tensor:
        return torch.tensor([p.length for p in pieces], dtype=torch.int64, device=device)

    def _post_send(self, tensor: torch.Tensor):
        return self.group.send([tensor], self.peer_rank, 0)  # one tag: the channel is ordered, as NCCL matches

    def _post_recv(self, tensor: torch.Tensor):
        return self.group.recv([tensor], self.peer_rank, 0)

    @staticmethod
    def _wait(work, deadline: float) -> None:
        work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))


def _kv_bytes(cache: torch.Tensor, blocks: int) -> int:
    return blocks * cache[:, :, 0].numel() * cache.element_size()


