"""What crosses between the router and the workers (Ray pickles these between our own processes; nothing a client
sends is unpickled: the router builds them from validated protobuf fields)."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.request import FinishReason
from pdserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class PrefillTask:
    request_id: str
    token_ids: tuple[int, ...]
    sampling: SamplingParams
    decode_worker: str
    """Where the KV goes; that worker has reserved blocks and posted the receive under `tag`."""
    tag: int


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token_id: int | None
    """None when the request was aborted before its first token."""
    text_delta: str
    finish_reason: FinishReason | None
    """None: the KV is on its way to the decode worker, which goes on. Otherwise the request ended here."""
    queue_s: float
    """Queued at the prefill worker until its first chunk ran."""
    prefill_s: float
    """First chunk -> first token."""


@dataclass(frozen=True)
class DecodeTask:
    request_id: str
    token_ids: tuple[int, ...]
    sampling: SamplingParams
    prefill_worker: str = ""
    """Who sends the KV (disaggregated); empty for a colocated request, which is prefilled where it decodes."""
    tag: int = 0


@dataclass(frozen=True)
class Reservation:
    """A decode worker took a request: its blocks are allocated and the KV receive is posted."""

    request_id: str
    num_blocks: int
    kv_blocks_free: int
    running: int


@dataclass(frozen=True)
class TokenEvent:
    """New tokens (or the end) of one request, drained by the router from a decode worker."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    text_delta: str = ""
    finish_reason: FinishReason | None = None
    error: str = ""
    """Set when the request failed on the worker (its KV never arrived, ...); finish_reason is ABORT then."""
    kv_transfer_s: float | None = None
    """On the event that starts decoding a handed-off request: the receive's duration."""
    handed_on: bool = False
    """The worker is leaving its pool and gave the request back (finish_reason ABORT): the router resumes it on
    another worker, as after a failure."""
    queue_s: float | None = None
    """Colocated, on the first token: queued at the worker until its first chunk ran."""
    prefill_s: float | None = None
    """Colocated, on the first token: first chunk -> first token."""
