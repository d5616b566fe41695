"""The KV connector interface: small and symmetric (the shape of SGLang's base connector).

Push, not pull: the decode worker reserves blocks first (admission happens where the memory is), the prefill worker
sends its blocks as soon as its prefill is done, and the decode worker posts the receive when it hears that (the
prefill worker announces each send to it directly, with the first token). The prefill side frees its blocks once
the send finishes, so prefill memory is held only for the handoff itself; a decode worker that is full refuses
before any KV moves, instead of leaving KV stranded.

The life of a transfer on either side: `start_send` / `start_recv` -> `poll` until it reports the transfer's
outcome -> the caller frees the blocks (on every outcome: done, failed, cancelled, timed out). No transfer outlives
its deadline: `poll` reports TIMED_OUT once it passes, whatever the peer does. A transfer reads and writes its blocks
in place while its messages are on the wire, so it is reported only once nothing touches its blocks any more: after
`cancel`, free them when `poll` reports it (at once for one still waiting its turn).

Sends and receives are matched one to one by tag, and a receive is posted only for a send that has started: so a
receive's timeout bounds the transfer, not a wait in some queue, and no transfer waits for KV that is not coming.
KV that nobody wants any more (its request was aborted, or reaped) still gets a receive, cancelled at once, which
discards it. A send of no blocks ends its receive as FAILED ("the KV will not come"); the workers do not use it, it is
there for peers that must answer a posted receive.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.distributed as dist

from pdserve.engine.kv_cache import KVCache
from pdserve.engine.layer_progress import LayerProgress


class TransferStatus(enum.Enum):
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class Transfer:
    """One direction of one handoff, as one side sees it."""

    transfer_id: str
    peer: str
    """The other worker's id."""
    block_ids: tuple[int, ...]
    """This side's blocks: the source when sending, the destination when receiving."""
    tag: int
    """The same number on both sides; tells the receiver which of its posted receives a transfer is for."""
    timeout_s: float = 30.0
    progress: LayerProgress | None = field(default=None, compare=False)
    """Sends of a step still running (layer-wise streaming): each layer goes once `progress` says it is computed;
    only connectors whose `streams_layers` is true take one."""


@dataclass(frozen=True)
class TransferResult:
    transfer_id: str
    status: TransferStatus
    error: str = ""
    seconds: float = 0.0
    """From start to the outcome."""
    bytes: int = 0


class TransferError(RuntimeError):
    """A transfer could not be started (unknown peer, duplicate id, mismatched shapes)."""


class KVConnector(abc.ABC):
    streams_layers = False
    """Whether sends may start before their KV is computed (`Transfer.progress`)."""

    @abc.abstractmethod
    def register(self, kv_cache: KVCache) -> None:
        """The worker's KV cache, which transfers read from and write into."""

    @abc.abstractmethod
    def start_send(self, transfer: Transfer) -> None:
        """Begin sending the blocks; returns at once."""

    @abc.abstractmethod
    def start_recv(self, transfer: Transfer) -> None:
        """Begin receiving into the blocks; returns at once."""

    @abc.abstractmethod
    def poll(self) -> list[TransferResult]:
        """Outcomes reached since the last poll; each transfer is reported exactly once."""

    @abc.abstractmethod
    def cancel(self, transfer_id: str) -> None:
        """Give up a transfer; a later poll reports it CANCELLED (unless it finished first), once nothing touches its
        blocks any more."""

    @abc.abstractmethod
    def discard(self, peer: str, tag: int) -> None:
        """Throw away the transfer `peer` sends under `tag` without writing a block (its request is gone here), so
        the send completes; nothing is reported for it. Raises TransferError when there is no pair with `peer`."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop; transfers still under way are abandoned (not reported)."""


class PairedConnector(KVConnector):
    """A connector between workers in other processes: each pair of workers is formed (`connect`, both sides at
    once, over a store both reach) before transfers between them can start."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.pairs: dict[str, object] = {}
        """The peers this worker has a working pair with (what its heartbeat lists)."""
        self.send_delay: Callable[[int], float] | None = None
        """Seconds every send waits before its KV moves, by block count: only simulation and fault injection set
        one (`kv_transfer.send_delay`); a real serving path has none."""
        self.model_fingerprint = ""
        """The model this worker serves (`engine.fingerprint`); a peer with another refuses to pair."""

    def pair_name(self, peer: str, generation: int = 0) -> str:
        """The same on both sides: a pair formed again after it broke (a new generation) meets under a new name."""
        return "|".join(sorted((self.worker_id, peer))) + f"|{generation}"

    @abc.abstractmethod
    def connect(self, peer: str, store: dist.Store, rank: int, timeout_s: float = 60.0, generation: int = 0) -> None:
        """Form the pair with `peer`; the peer calls this too, with the same store, the other rank and the same
        `generation`. Raises PairRefused (on both sides) when their KV layouts or models differ."""

    @abc.abstractmethod
    def disconnect(self, peer: str) -> None:
        """Let go of the pair with `peer`."""

    @abc.abstractmethod
    def transport(self, peer: str) -> str:
        """How the pair with `peer` moves KV ("gloo", "nccl", "nixl", "ipc"); what the worker's metrics count."""
