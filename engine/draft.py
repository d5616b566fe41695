"""The draft model of speculative decoding (`engine.speculative.method: draft`): a cheaper copy of the model itself
that proposes up to k tokens per request before each step, reading the model's own KV cache.

The draft is the model with its linear layers quantised (`draft_quantization`, int4 by default) and, optionally,
only its first `draft_layers` layers; it shares every tensor it does not replace (embedding table, norms, rope
tables) with the model. Its layers approximate the model's, so it attends over the model's KV for every computed
position: it has no KV cache and no prefill of its own, and in a disaggregated cluster the KV the prefill worker
sends serves both (nothing else crosses the handoff, and the prefill worker is unchanged). A proposal's KV, in the
draft's layers, goes into the slots after the request's computed tokens; the model's verify pass over the same
positions, later in the same step, overwrites it, so the cache never keeps a draft's value.

Life of a draft step (`Drafter.propose`), for the chunks with `draft_tokens` > 0:

    iteration i (0 .. k-1), over the chunks still proposing: one decode step of the draft, its input the request's
    last token (i = 0) or its previous proposal, at position start_pos + i -> logits -> a proposal: the argmax for
    greedy requests; for sampled ones a draw from the draft's distribution q (after temperature and top-k/p), with
    q kept for the acceptance rule (`engine.rejection`)
    -> the chunks with their proposals appended (`ScheduledChunk.proposed`), for the model to verify.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from pdserve.engine.config import ConfigError, SpeculativeSettings
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.model import LlamaModel
from pdserve.engine.quantization import Quantization, quantize_model
from pdserve.engine.sampler import filter_rows
from pdserve.engine.scheduler import ScheduledChunk


def build_draft(model: LlamaModel, settings: SpeculativeSettings, model_quantization: str) -> LlamaModel:
    """The draft of `model` (already quantised by `model_quantization`): a copy sharing every tensor, its first
    `draft_layers` layers kept, its linear layers quantised by `draft_quantization` if that differs."""
    if settings.draft_layers is not None and settings.draft_layers > len(model.layers):
        raise ConfigError(f"engine.speculative.draft_layers: {settings.draft_layers} is more than the model's "
                          f"{len(model.layers)} layers")
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    shared[id(model.rope)] = model.rope
    draft = copy.deepcopy(model, shared)
    if settings.draft_layers is not None:
        draft.layers = nn.ModuleList(list(draft.layers)[:settings.draft_layers])
    if settings.draft_quantization != model_quantization:
        quantize_model(draft, Quantization(settings.draft_quantization))  # replaces modules; the model's stay
    return draft


@dataclasses.dataclass(frozen=True)
class Drafted:
    chunks: tuple[ScheduledChunk, ...]
    """The step's chunks, those that speculate with their proposals appended."""
    draft_probs: dict[str, torch.Tensor]
    """Request id -> [k, V] the distributions its proposals were drawn from (sampled requests only)."""


class Drafter:
    def __init__(self, draft: LlamaModel, kv_cache: KVCache, prepare: Callable, generator: torch.Generator) -> None:
        """`prepare`: the runner's step preparation (chunks -> `StepInput`); `generator`: the sampler's."""
        self.draft = draft
        self.kv_cache = kv_cache
        self.prepare = prepare
        self.generator = generator

    @torch.inference_mode()
    def propose(self, chunks: tuple[ScheduledChunk, ...]) -> Drafted:
        drafting = [c for c in chunks if c.draft_tokens > 0]
        proposals: dict[str, list[int]] = {c.request_id: [] for c in drafting}
        probs: dict[str, list[torch.Tensor]] = {c.request_id: [] for c in drafting if not c.sampling.greedy}
        for i in range(max((c.draft_tokens for c in drafting), default=0)):
            active = [c for c in drafting if c.draft_tokens > i]
            inputs = tuple(_draft_input(c, i, proposals[c.request_id]) for c in active)
            step = self.prepare(inputs)
            hidden = self.draft(step.input_ids, step.positions, self.kv_cache, step.meta)  # [B, hidden]
            logits = self.draft.logits(hidden)  # [B, V]
            for chunk, token in zip(active, self._pick(logits, active, probs)):
                proposals[chunk.request_id].append(token)
        out = tuple(_with_proposals(c, tuple(proposals[c.request_id])) if c.draft_tokens else c for c in chunks)
        return Drafted(out, {r: torch.stack(rows) for r, rows in probs.items()})

    def _pick(self, logits: torch.Tensor, chunks: list[ScheduledChunk],
              probs: dict[str, list[torch.Tensor]]) -> list[int]:
        """logits: [B, V] -> each chunk's proposal (one host sync); a sampled chunk's distribution goes to `probs`."""
        tokens = logits.argmax(dim=-1)  # [B]
        sampled = [row for row, c in enumerate(chunks) if not c.sampling.greedy]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            q = torch.softmax(filter_rows(logits[index], [chunks[r].sampling for r in sampled]), dim=-1)  # [S, V]
            tokens[index] = torch.multinomial(q, 1, generator=self.generator)[:, 0]
            for row, distribution in zip(sampled, q):
                probs[chunks[row].request_id].append(distribution)
        return tokens.tolist()


def _draft_input(chunk: ScheduledChunk, i: int, proposed: list[int]) -> ScheduledChunk:
    """The draft's one-token chunk for iteration i: the request's last token, then each proposal in turn."""
    token = chunk.token_ids[-1] if i == 0 else proposed[-1]
    return dataclasses.replace(chunk, token_ids=(token,), start_pos=chunk.start_pos + i, proposed=(), draft_tokens=0,
                               prompt_targets=(), grammar=None)


def _with_proposals(chunk: ScheduledChunk, proposed: tuple[int, ...]) -> ScheduledChunk:
    return dataclasses.replace(chunk, token_ids=chunk.token_ids + proposed, proposed=proposed)
