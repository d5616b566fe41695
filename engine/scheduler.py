"""Continuous batching: which requests run in the next step, and how many tokens each.

The scheduler decides, the model runner executes; only the frozen `SchedulerOutput` crosses. Each step has a token
budget (`max_num_batched_tokens`). Order of service:

1. running requests that are decoding (one token each), so a long prompt never stalls them;
2. running requests still in their prefill (the next chunk, up to the remaining budget);
3. waiting requests while the budget, `max_num_seqs` and free blocks allow.

Within each, requests go in `Request.order`: higher priority (a lower `priority` value) first, then oldest first.
A request gets the blocks for its new tokens before it is scheduled. When none are free the running request last in
that order is preempted: its blocks are freed and it goes back to the waiting queue (ahead of every later arrival of
its priority), to be recomputed from its prompt plus the tokens it already produced. A waiting request that finds no
room also preempts running requests of lower priority (never of its own), so batch work yields to online work.
Nothing is dropped.

Speculative decoding (`engine.speculative`, while at most `max_batch` requests decode and it pays,
`engine.speculation_governor`): a decoding request that
speculates gets a chunk of its last token plus up to k proposed tokens (`engine.prompt_lookup`), or a chunk of its
last token that a draft model extends by up to k in the runner (`engine.draft`), or its last token followed by a
lookahead window and n-grams to verify (`engine.lookahead`), with blocks for all of them (`engine.speculation`);
after the step only the KV of the proposals the model accepted counts as computed (`advance(computed=)`).

Prefix caching: a request admitted from the queue (or reserved) first takes the cached blocks of its longest cached
prefix (`BlockManager.cached_prefix`) and starts computing at the first uncached token; each block it fills is
registered under its hash as soon as its KV is computed (or received), so later requests can share it. At least the
prompt's last token is always computed (`prefix_hash.shareable_blocks`).

Disaggregation hooks: `hold` parks a request (prefill done) with its blocks, outside the running set, until
`finish` frees them; `reserve` allocates blocks for a request whose KV will be written from elsewhere (sharing the
blocks of a cached prefix, whose KV need not be sent), and `commit` starts decoding it. A reservation waits while a
request of its priority or higher waits here: preempted requests come back before new ones come in.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from pdserve.engine import speculation
from pdserve.engine.block_manager import BlockManager, blocks_for
from pdserve.engine.config import SpeculativeSettings
from pdserve.engine.grammar_state import GrammarState
from pdserve.engine.logits_adjust import TokenHistory
from pdserve.engine.lookahead import Layout
from pdserve.engine.prefix_hash import ROOT, block_hashes, shareable_blocks
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.speculation import Speculation
from pdserve.engine.speculation_governor import Governor


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Compute `token_ids` at positions start_pos.. for one request, whose KV lives in `block_ids`."""

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_ids: tuple[int, ...]
    sample: bool
    """True when this chunk reaches the request's last known token, so a next token is sampled."""
    sampling: SamplingParams
    output_index: int
    """How many output tokens the request has; the sampled token will be output number `output_index`."""
    history: TokenHistory | None = None
    """The tokens so far, for a request whose penalties read them (`SamplingParams.needs_history`); else None."""
    prompt_targets: tuple[int, ...] = ()
    """For a request that asks for prompt logprobs: the prompt tokens its first rows predict (the token after each
    position, as far as the prompt goes)."""
    grammar: GrammarState | None = None
    """A sampling chunk's structured-output state (it masks the logits); else None."""
    proposed: tuple[int, ...] = ()
    """Speculative decoding: tokens proposed after the request's last one (they end `token_ids`); the model's pick
    after each position is checked against them (`engine.prompt_lookup`)."""
    draft_tokens: int = 0
    """Speculative decoding with a draft model: how many tokens the draft is to propose after the request's last one,
    in the runner before the step (`engine.draft`); their KV slots are allocated."""

    lookahead: Layout | None = None
    """Lookahead decoding: the layout of the window and candidates after the request's last token (`engine.lookahead`);
    the chunk's positions and attention mask come from it."""

    @property
    def speculates(self) -> bool:
        return bool(self.proposed) or self.draft_tokens > 0 or self.lookahead is not None

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        """Rows the step's forward pass computes: each chunk's tokens and a draft's proposals."""
        return sum(len(c.token_ids) + c.draft_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int, max_num_seqs: int,
                 speculative: SpeculativeSettings | None = None) -> None:
        self.blocks = blocks
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.speculative = speculative or SpeculativeSettings()
        self.governor = Governor(self.speculative.max_batch, self.speculative.measured) \
            if self.speculative.enabled else None
        """Whether speculation pays here, measured (`engine.speculation_governor`); the engine reports each step."""
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.held: dict[str, Request] = {}

    # ---- queue changes -------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self._enqueue(request)

    def finish(self, request: Request) -> None:
        """Remove a request from wherever it is and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING and request in self.waiting:
            self.waiting.remove(request)
        self.held.pop(request.request_id, None)
        self._free_blocks(request)
        request.status = RequestStatus.FINISHED

    def hold(self, request: Request) -> None:
        """Park a running request with its blocks (its prefill is done; KV awaits the handoff)."""
        self.running.remove(request)
        request.status = RequestStatus.HELD
        self.held[request.request_id] = request

    def reserve(self, request: Request) -> bool:
        """Allocate blocks for a request's prompt, whose KV will be written from elsewhere.

        False when too few blocks are free, when max_num_seqs requests are already running or reserved, or when a
        request of its priority or higher waits here (one preempted, say): that one is admitted first, so a stream of
        new reservations cannot take every block it frees and leave it waiting."""
        if self.waiting and self.waiting[0].priority <= request.priority:
            return False
        cached = self._cached_prefix(request)
        needed = blocks_for(request.num_tokens, self.blocks.block_size) - len(cached)
        if not self._fits_after_preempting(request, needed + self.blocks.evictable_among(cached)):
            return False  # preempting would not make room: lose no one's KV for nothing
        while len(self.running) + len(self.held) >= self.max_num_seqs or not self.blocks.can_allocate(
                needed + self.blocks.evictable_among(cached)):
            if self._preempt_below(request) is None:
                return False
        self._take_cached(request, cached)
        request.block_ids += self.blocks.allocate(needed)
        request.status = RequestStatus.HELD
        self.held[request.request_id] = request
        return True

    def commit(self, request: Request) -> None:
        """A held request whose KV covers all but its last token starts decoding."""
        self._register_computed(request)
        self.held.pop(request.request_id)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step --------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        step = _Step(self.max_num_batched_tokens)
        preempted: list[str] = []
        ordered = sorted(self.running, key=_order)
        decoding = [r for r in ordered if r.is_decoding]
        prefilling = [r for r in ordered if not r.is_decoding]
        speculating = self.governor is not None and self.governor.speculate(len(decoding))
        for request in decoding + prefilling:
            if step.left == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            count = min(request.num_uncomputed, step.left)
            k = self._speculation_k(request, step.left - 1) if speculating and request.is_decoding else 0
            extra = speculation.plan(request, self.speculative, k, step.left - 1)
            if self._grow(request, count + extra.reserved, step, preempted):
                step.add(self._chunk(request, count, extra))
        if not preempted:
            self._admit(step, preempted)
        return SchedulerOutput(chunks=tuple(step.chunks.values()), preempted=tuple(preempted))

    def advance(self, chunk: ScheduledChunk, request: Request, computed: int | None = None) -> None:
        """The runner computed the chunk's tokens (`computed`: the request's tokens with KV now, when fewer: a
        speculative chunk keeps only the KV of the proposals accepted)."""
        request.num_computed_tokens = chunk.context_len if computed is None else computed
        self._register_computed(request)

    # ---- internals -------------------------------------------------------------------------------------------
    def _admit(self, step: _Step, preempted: list[str]) -> None:
        while self.waiting and step.left > 0:
            request = self.waiting[0]
            if len(self.running) >= self.max_num_seqs:
                if not self._preempt_below(request, step, preempted):
                    break
                continue
            cached = self._cached_prefix(request)
            start = max(request.num_computed_tokens, len(cached) * self.blocks.block_size)
            count = min(request.num_tokens - start, step.left)
            extra = self.blocks.blocks_to_grow(max(len(request.block_ids), len(cached)), start + count)
            if not self.blocks.can_allocate(extra + self.blocks.evictable_among(cached)):
                if not self._preempt_below(request, step, preempted):
                    break
                continue
            self.waiting.popleft()
            self._take_cached(request, cached)
            request.block_ids += self.blocks.allocate(extra)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            step.add(self._chunk(request, count))

    def _grow(self, request: Request, count: int, step: _Step, preempted: list[str]) -> bool:
        """Give `request` blocks for `count` more tokens, preempting the newest running requests if needed."""
        extra = self.blocks.blocks_to_grow(len(request.block_ids), request.num_computed_tokens + count)
        if extra == 0:
            return True  # the common decode step: the token fits in the last block
        while not self.blocks.can_allocate(extra):
            victim = max(self.running, key=_order)
            self._preempt(victim)
            step.drop(victim.request_id)  # a preempted victim gives its tokens back
            preempted.append(victim.request_id)
            if victim is request:
                return False
        request.block_ids += self.blocks.allocate(extra)
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._free_blocks(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self._enqueue(request)

    def _preempt_below(self, request: Request, step: _Step | None = None,
                       preempted: list[str] | None = None) -> Request | None:
        """Preempt the running request last in service order if its priority is lower than `request`'s (to make
        room for it); the victim, or None when there is none."""
        victim = max(self.running, key=_order, default=None)
        if victim is None or victim.priority <= request.priority:
            return None
        self._preempt(victim)
        if step is not None:
            step.drop(victim.request_id)
        if preempted is not None:
            preempted.append(victim.request_id)
        return victim

    def _fits_after_preempting(self, request: Request, blocks: int) -> bool:
        """Whether a seat and `blocks` free blocks could be had for `request` by preempting every running request of
        lower priority (their blocks counted as if none were shared)."""
        victims = [r for r in self.running if r.priority > request.priority]
        seats = self.max_num_seqs - len(self.running) - len(self.held) + len(victims)
        return seats > 0 and blocks <= self.blocks.num_free + sum(len(r.block_ids) for r in victims)

    def _enqueue(self, request: Request) -> None:
        """Into the waiting queue at its place in service order (a preempted request keeps its arrival)."""
        index = bisect.bisect_right([r.order for r in self.waiting], request.order)
        self.waiting.insert(index, request)

    def _free_blocks(self, request: Request) -> None:
        self.blocks.free(reversed(request.block_ids))  # a prefix's tail is evicted before its head
        request.block_ids = []
        request.num_registered_blocks = 0

    # ---- prefix caching --------------------------------------------------------------------------------------
    def _cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks a request without blocks could start from (no reference taken yet)."""
        if request.block_ids or not self.blocks.caching or request.sampling.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        shareable = shareable_blocks(request.num_tokens, self.blocks.block_size)
        return self.blocks.cached_prefix(self._hashes(request, shareable)[:shareable])

    def _take_cached(self, request: Request, cached: list[int]) -> None:
        if not cached:
            return
        self.blocks.share(cached)
        request.block_ids = list(cached)
        request.num_registered_blocks = len(cached)
        request.num_computed_tokens = len(cached) * self.blocks.block_size
        if not request.output_token_ids:  # the prompt's own hit (a preempted request re-taking its blocks is not)
            request.num_cached_tokens = request.num_computed_tokens

    def _register_computed(self, request: Request) -> None:
        """Name every block whose KV is now complete, so later requests can share it."""
        if not self.blocks.caching:
            return
        full = min(request.num_computed_tokens // self.blocks.block_size, len(request.block_ids))
        if full <= request.num_registered_blocks:
            return
        hashes = self._hashes(request, full)
        for i in range(request.num_registered_blocks, full):
            self.blocks.register(request.block_ids[i], hashes[i])
        request.num_registered_blocks = full

    def _hashes(self, request: Request, count: int) -> list[int]:
        """The hashes of a request's first `count` full blocks (computed once, extended as it grows)."""
        known = request.block_hashes
        if len(known) < count:
            parent = known[-1] if known else ROOT
            tokens = request.token_slice(len(known) * self.blocks.block_size,
                                         (count - len(known)) * self.blocks.block_size)
            known += block_hashes(tokens, self.blocks.block_size, parent=parent)
        return known

    def _speculation_k(self, request: Request, room: int) -> int:
        """Tokens a decoding request may have proposed this step: up to k, within the step's budget (`room`) and its
        max_tokens (the last emitted token is the model's own); 0 if it does not speculate or pauses."""
        if not request.speculative:
            return 0
        if request.speculation_pause > 0:
            request.speculation_pause -= 1
            return 0
        return max(0, min(self.speculative.k, room, request.sampling.max_tokens - len(request.output_token_ids) - 1))

    @staticmethod
    def _chunk(request: Request, count: int, extra: Speculation = speculation.NONE) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_slice(start, count) + extra.tokens,
            start_pos=start,
            block_ids=tuple(request.block_ids),
            sample=start + count == request.num_tokens,
            sampling=request.sampling,
            output_index=request.resumed_tokens + len(request.output_token_ids),
            history=_history(request) if request.sampling.needs_history and start + count == request.num_tokens
            else None,
            prompt_targets=request.prompt_token_ids[start + 1:start + count + 1]
            if request.prompt_logprobs is not None else (),  # None where the prompt was computed elsewhere
            grammar=request.grammar if start + count == request.num_tokens else None,
            proposed=extra.proposed,
            draft_tokens=extra.draft_tokens,
            lookahead=extra.lookahead,
        )


class _Step:
    """The chunks one `schedule` call has chosen so far, and how much of the token budget is left."""

    def __init__(self, budget: int) -> None:
        self.chunks: dict[str, ScheduledChunk] = {}
        self.left = budget

    def add(self, chunk: ScheduledChunk) -> None:
        self.chunks[chunk.request_id] = chunk
        self.left -= len(chunk.token_ids) + chunk.draft_tokens  # a draft's proposals are rows of the step too

    def drop(self, request_id: str) -> None:
        chunk = self.chunks.pop(request_id, None)
        if chunk is not None:
            self.left += len(chunk.token_ids) + chunk.draft_tokens


def _order(request: Request) -> tuple[int, int]:
    return request.order


def _history(request: Request) -> TokenHistory:
    """A resumed request's output so far ends its prompt: it counts as output."""
    split = len(request.prompt_token_ids) - request.resumed_tokens
    return TokenHistory(request.prompt_token_ids[:split],
                        (*request.prompt_token_ids[split:], *request.output_token_ids))
