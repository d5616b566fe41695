"""Two ranks of a point-to-point transport inside one process, matching messages by order as NCCL does.

NCCL ignores the tag of a send or receive: the k-th send from rank A to rank B meets the k-th receive that B posts
for A, whatever either's tag. gloo matches by tag, so a connector that relied on tags would pass every gloo test and
swap two requests' KV on NCCL. `LoopbackGroup` ignores tags too, and refuses a receive whose size differs from the
send it meets (NCCL would hang or corrupt), so tests of `TorchDistConnector` over it prove the ordering. A send
completes once a receive has taken its bytes (a rendezvous, as NCCL's sends of any real size are).

    first, second = LoopbackGroup.pair()
    connector_a.add_pair("b", first, peer_rank=1)
    connector_b.add_pair("a", second, peer_rank=0)
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta

import torch


class LoopbackWork:
    """One posted send or receive; `wait` returns once it met its partner and the bytes moved."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: str | None = None

    def wait(self, timeout: timedelta | None = None) -> bool:
        seconds = None if timeout is None else timeout.total_seconds()
        if not self._done.wait(seconds):
            raise RuntimeError(f"loopback: timed out after {seconds} s waiting for the peer")
        if self._error is not None:
            raise RuntimeError(f"loopback: {self._error}")
        return True

    def finish(self, error: str | None = None) -> None:
        self._error = error
        self._done.set()


@dataclass
class _Direction:
    """Messages one way: sends not yet received and receives not yet sent to, in posting order."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sends: deque[tuple[torch.Tensor, LoopbackWork]] = field(default_factory=deque)
    recvs: deque[tuple[torch.Tensor, LoopbackWork]] = field(default_factory=deque)
    closed: bool = False


class LoopbackGroup:
    """One rank's end; `pair()` makes both."""

    def __init__(self, rank: int, outgoing: _Direction, incoming: _Direction) -> None:
        self._rank = rank
        self._outgoing, self._incoming = outgoing, incoming
        self.sent = 0
        """Messages this end has sent (tests count them)."""

    @staticmethod
    def pair() -> tuple[LoopbackGroup, LoopbackGroup]:
        zero_to_one, one_to_zero = _Direction(), _Direction()
        return LoopbackGroup(0, zero_to_one, one_to_zero), LoopbackGroup(1, one_to_zero, zero_to_one)

    def rank(self) -> int:
        return self._rank

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> LoopbackWork:
        self.sent += 1
        return _post(self._outgoing, tensors[0], sending=True)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> LoopbackWork:
        return _post(self._incoming, tensors[0], sending=False)

    def abort(self) -> None:
        """Fail every message posted and not yet met, both ways (as a broken communicator does)."""
        for direction in (self._outgoing, self._incoming):
            with direction.lock:
                direction.closed = True
                for _, work in (*direction.sends, *direction.recvs):
                    work.finish("the group was aborted")
                direction.sends.clear()
                direction.recvs.clear()


def _post(direction: _Direction, tensor: torch.Tensor, sending: bool) -> LoopbackWork:
    work = LoopbackWork()
    with direction.lock:
        if direction.closed:
            work.finish("the group was aborted")
            return work
        partners = direction.recvs if sending else direction.sends
        if not partners:
            (direction.sends if sending else direction.recvs).append((tensor, work))
            return work
        other, other_work = partners.popleft()
    source, target = (tensor, other) if sending else (other, tensor)
    if source.shape != target.shape or source.dtype != target.dtype:
        error = f"a {tuple(source.shape)} {source.dtype} send met a {tuple(target.shape)} {target.dtype} receive"
    else:
        target.copy_(source)
        if target.is_cuda:  # done on the device before either side hears it is, whichever stream it ran on
            torch.cuda.current_stream(target.device).synchronize()
        error = None
    work.finish(error)
    other_work.finish(error)
    return work
