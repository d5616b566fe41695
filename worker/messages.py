"""What crosses between routers and workers, and between a prefill and a decode worker. Ray pickles these between
our own processes; nothing a client sends is unpickled: routers build them from validated protobuf fields.

Every request on a worker is known by its key, which the router that sent it makes unique in the cluster (the
client's request id, the router's id and the attempt: `router.attempt.request_key`), so two routers never collide
even when their clients reuse an id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.logprobs import TokenLogprobs
from pdserve.engine.request import ONLINE_PRIORITY, FinishReason
from pdserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Owner:
    """Who a request on a decode worker belongs to: the router that streams it to its client, and where its tokens
    sit in that client's output."""

    router_id: str
    client_request_id: str
    position: int = 0
    """Tokens the client already had when this attempt began (0, or more for a request resumed elsewhere)."""
    prompt_digest: str = ""
    """`prompt_digest` of the client's prompt: a router taking the request over must name the same prompt, so one
    client's id cannot take over another client's request."""


def prompt_digest(token_ids: Sequence[int]) -> str:
    """A short digest of a prompt's token ids (what `Owner.prompt_digest` holds and an adoption must match)."""
    return hashlib.blake2b(b",".join(str(t).encode() for t in token_ids), digest_size=16).hexdigest()


@dataclass(frozen=True)
class DecodeTask:
    request_id: str
    token_ids: tuple[int, ...]
    sampling: SamplingParams
    owner: Owner
    prefill_worker: str = ""
    """Who sends the KV (disaggregated); empty for a colocated request, which is prefilled where it decodes."""
    resumed_tokens: int = 0
    """The prompt's last tokens are output its client already has (`Engine.add_request`)."""
    priority: int = ONLINE_PRIORITY
    """Lower is served first and preempted last (`engine.scheduler`)."""


@dataclass(frozen=True)
class Reservation:
    """A decode worker took a request: its blocks are allocated, and its KV will arrive under `tag`."""

    request_id: str
    tag: int
    """Chosen by the decode worker, unique among its transfers, so the tags of two routers never collide."""
    num_blocks: int
    kv_blocks_free: int
    running: int
    cached_blocks: int = 0
    """Leading blocks of the prompt this worker holds already (its prefix cache): their KV is not sent."""


@dataclass(frozen=True)
class PrefillTask:
    request_id: str
    token_ids: tuple[int, ...]
    sampling: SamplingParams
    decode_worker: str
    """Where the KV goes; that worker has reserved blocks for it under `tag`."""
    tag: int
    skip_blocks: int = 0
    """Leading blocks the decode worker holds already (`Reservation.cached_blocks`): computed here if missing, but
    not sent."""
    resumed_tokens: int = 0
    """The prompt's last tokens are output its client already has (`Engine.add_request`)."""
    priority: int = ONLINE_PRIORITY


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token_id: int | None
    """None when the request was aborted before its first token (or its KV could not be sent)."""
    text_delta: str
    finish_reason: FinishReason | None
    """None: the KV is on its way to the decode worker, which goes on. Otherwise the request ended here."""
    queue_s: float
    """Queued at the prefill worker until its first chunk ran."""
    prefill_s: float
    """First chunk -> first token."""
    cached_tokens: int = 0
    """Prompt tokens whose KV this worker took from its prefix cache instead of computing it."""
    first_logprobs: TokenLogprobs | None = None
    """The first token's logprobs, when the request asked for them."""
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    """One per prompt token (the first None), when the request asked for them."""


@dataclass(frozen=True)
class KVAnnouncement:
    """From the prefill worker to the decode worker, as its KV send starts: post the receive. It travels between the
    two workers directly, so a handoff never waits on a router (nor dies with one)."""

    request_id: str
    tag: int
    prefill_worker: str
    first_token_id: int | None
    """None when the KV is streamed layer by layer (`kv_transfer.layerwise`): the send starts before the first
    token is sampled, which follows in a `FirstToken`."""
    num_blocks: int
    """What is on the wire: a decode worker that no longer wants the KV (the request was aborted or reaped)
    receives and drops this many blocks, so the sender's send completes and the pair stays in step."""
    first_logprobs: TokenLogprobs | None = None
    """The first token's logprobs (when asked for): the decode worker's journal of the request starts with them."""


@dataclass(frozen=True)
class FirstToken:
    """From the prefill worker to the decode worker, after a streamed send's announcement (`KVAnnouncement` with no
    first token): the token its step sampled. `finished`: the request ended at it (EOS, a stop, max_tokens 1), so
    the decode worker drops it and frees its blocks."""

    request_id: str
    tag: int
    first_token_id: int
    first_logprobs: TokenLogprobs | None = None
    finished: bool = False


@dataclass(frozen=True)
class TokenEvent:
    """New tokens (or the end) of one request, collected by its router from a decode worker."""

    request_id: str
    position: int = 0
    """Where `token_ids` start in the client's output: a router passes on only tokens past what its client has."""
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
    adopted_by: str = ""
    """Another router took the request over (its client reconnected there); this router's stream of it ends."""
    queue_s: float | None = None
    """Colocated, on the first token: queued at the worker until its first chunk ran."""
    prefill_s: float | None = None
    """Colocated, on the first token: first chunk -> first token."""
    cached_tokens: int = 0
    """Colocated, on the first token: prompt tokens whose KV came from the prefix cache."""
    logprobs: tuple[TokenLogprobs, ...] = ()
    """One per token of `token_ids`, when the request asked for them."""
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    """Colocated, on the first token: the prompt's logprobs, when the request asked for them."""
    speculative_proposed: int = 0
    speculative_accepted: int = 0
    """On the first event of a speculative step: the tokens proposed, and of those the ones accepted."""

    @property
    def end(self) -> int:
        return self.position + len(self.token_ids)


@dataclass(frozen=True)
class Adoption:
    """A decode worker handed a request's ownership to the router that asked (`adopt`): what its client has not yet
    seen so far, then the rest as events to that router."""

    request_id: str
    prefill_worker: str
    events: tuple[TokenEvent, ...]
