"""Execute one scheduled step: build the flat token batch and attention metadata, run the model, sample.

Chunks of one token (decoding requests) go first, longer chunks (prefills) follow. With torch attention the
decoding requests share one batched attention call and each prefill has its own; with the paged kernels one call
serves them all. Only the rows that sample a token go through the final norm and the LM head. Step inputs are
built per chunk, never per token, and moved to the device in one copy each; the one host sync of a step is the
sampled tokens coming back. A decode-only step runs through `graphs` when it is set: a captured CUDA graph
(`engine.cuda_graphs`) on the paged path, a compiled one (`engine.compiled_decode`) on the torch path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.draft import Drafter
from pdserve.engine.grammar_state import PendingMasks
from pdserve.engine.kv_cache import AttentionMetadata, DecodeGroup, KVCache, PagedBatch, PrefillSegment
from pdserve.engine.layer_progress import LayerProgress
from pdserve.engine.logprobs import Sampled, StepResult, TokenLogprobs
from pdserve.engine.model import LlamaModel
from pdserve.engine.prompt_lookup import verify
from pdserve.engine.rejection import accept, certain
from pdserve.engine.sampler import Sampler, filter_rows, logprobs_of
from pdserve.engine.scheduler import ScheduledChunk


@dataclass(frozen=True)
class StepInput:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [N] row of each sampling chunk's last token
    sample_chunks: tuple[ScheduledChunk, ...]
    first_rows: dict[str, int]
    """Each chunk's first row in the step (by request id)."""
    verify_chunks: tuple[ScheduledChunk, ...] = ()
    """Speculative chunks: the model's pick after each of their rows is checked against their proposals."""


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, sampler: Sampler, paged: bool = False) -> None:
        """`paged`: build `PagedBatch` metadata for the Triton kernels instead of the torch path's gathers."""
        self.model = model
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.paged = paged
        self.device = kv_cache.tensor.device
        self.graphs = None
        """Runs decode-only steps when set by the engine: an `engine.cuda_graphs.DecodeGraphs` or an
        `engine.compiled_decode.CompiledDecode`."""
        self.drafter: Drafter | None = None
        """Speculative decoding's draft model (`engine.draft`), set by the engine when it speculates with one."""

    @torch.inference_mode()
    def run(self, chunks: tuple[ScheduledChunk, ...], streams: Sequence[LayerProgress] = ()) -> StepResult:
        """Compute the chunks; return the sampled token of each chunk that samples, and the prompt logprobs of the
        chunks that ask for them. `streams`: told as each layer is done (layer-wise KV streaming)."""
        prompt_logprobs = {}
        draft_probs: dict[str, torch.Tensor] = {}
        if self.drafter is not None and any(c.draft_tokens for c in chunks):
            drafted = self.drafter.propose(chunks)
            chunks, draft_probs = drafted.chunks, drafted.draft_probs
        if self.graphs is not None and self.graphs.serves(chunks):
            masks = self._begin_masks(chunks)
            logits = self.graphs.run(chunks)  # [B, V], every chunk samples
            sample_chunks = chunks
        else:
            step = self.prepare(chunks)
            masks = self._begin_masks(step.sample_chunks)
            on_layer = (lambda i: [progress.layer_done(i) for progress in streams]) if streams else None
            hidden = self.model(step.input_ids, step.positions, self.kv_cache, step.meta, on_layer)  # [T, hidden]
            prompt_logprobs = self._prompt_logprobs(chunks, hidden, step.first_rows)
            verified = self._verify(step.verify_chunks, hidden, step.first_rows, draft_probs)
            if not step.sample_chunks:
                return StepResult(verified, prompt_logprobs)
            logits = self.model.logits(hidden[step.sample_rows])  # [N, V]
            sample_chunks = step.sample_chunks
            return StepResult({**self._sample(logits, sample_chunks, masks), **verified}, prompt_logprobs)
        return StepResult(self._sample(logits, sample_chunks, masks), prompt_logprobs)

    def _verify(self, chunks: tuple[ScheduledChunk, ...], hidden: torch.Tensor, first_rows: dict[str, int],
                draft_probs: dict[str, torch.Tensor]) -> dict[str, Sampled]:
        """hidden: [T, hidden] -> for each speculative chunk the tokens it emits: for a greedy request the model's
        pick after each of its rows, kept while it agrees with the proposals; for a sampled one those the acceptance
        rule keeps (`engine.rejection`), its proposals drawn from `draft_probs[request_id]` (a draft model's) or else
        certain (prompt lookup's)."""
        if not chunks:
            return {}
        rows = torch.cat([torch.arange(first_rows[c.request_id], first_rows[c.request_id] + len(c.token_ids))
                          for c in chunks]).to(self.device)
        logits = self.model.logits(hidden[rows])  # [R, V]
        picks = logits.argmax(dim=-1).tolist()  # [R], one host sync
        verified, offset = {}, 0
        for chunk in chunks:
            count = len(chunk.token_ids)
            if chunk.lookahead is not None:  # the engine verifies its candidates and moves its window
                verified[chunk.request_id] = Sampled(picks[offset], picks=tuple(picks[offset:offset + count]))
                offset += count
                continue
            if not chunk.sampling.greedy:
                target = torch.softmax(filter_rows(logits[offset:offset + count], [chunk.sampling] * count), dim=-1)
                drafted = draft_probs.get(chunk.request_id)
                if drafted is None:
                    drafted = certain(chunk.proposed, logits.shape[-1], logits.device)
                emitted = accept(chunk.proposed, drafted, target, self.sampler.generator)
            else:
                emitted = verify(chunk.proposed, picks[offset:offset + count])
            verified[chunk.request_id] = Sampled(emitted[0], more=emitted[1:], proposed=len(chunk.proposed))
            offset += count
        return verified

    def _begin_masks(self, sample_chunks: tuple[ScheduledChunk, ...]) -> PendingMasks | None:
        """Structured output's masks, computed on the grammar thread while the model runs."""
        states = [c.grammar for c in sample_chunks if c.grammar is not None]
        return self.sampler.grammars.begin_masks(states) if states else None

    def _prompt_logprobs(self, chunks: tuple[ScheduledChunk, ...], hidden: torch.Tensor,
                         first_rows: dict[str, int]) -> dict[str, tuple[TokenLogprobs, ...]]:
        """hidden: [T, hidden] -> for each chunk with prompt targets, the logprob of each target at the row before
        it (and its alternatives)."""
        found = {}
        for chunk in chunks:
            if chunk.prompt_targets:
                first = first_rows[chunk.request_id]
                logits = self.model.logits(hidden[first:first + len(chunk.prompt_targets)])  # [P, V]
                found[chunk.request_id] = tuple(logprobs_of(logits, chunk.prompt_targets,
                                                            [chunk.sampling.prompt_logprobs] * len(logits)))
        return found

    def _sample(self, logits: torch.Tensor, sample_chunks: tuple[ScheduledChunk, ...],
                masks: PendingMasks | None = None) -> dict[str, Sampled]:
        """logits: [N, V] raw, one row per sampling chunk; `masks`: those of its chunks with a grammar, in order."""
        tokens = self.sampler.sample(logits, [c.sampling for c in sample_chunks],
                                     [c.output_index for c in sample_chunks], [c.history for c in sample_chunks],
                                     [c.grammar for c in sample_chunks], masks)
        sampled = {c.request_id: Sampled(t) for c, t in zip(sample_chunks, tokens)}
        asking = [i for i, c in enumerate(sample_chunks) if c.sampling.logprobs is not None]
        if asking:  # from the raw logits: `sample` adjusted a copy
            found = logprobs_of(logits[torch.tensor(asking, device=logits.device)], [tokens[i] for i in asking],
                                [sample_chunks[i].sampling.logprobs for i in asking])
            for i, entry in zip(asking, found):
                sampled[sample_chunks[i].request_id] = Sampled(tokens[i], entry)
        return sampled

    def prepare(self, chunks: tuple[ScheduledChunk, ...]) -> StepInput:
        decodes = [c for c in chunks if len(c.token_ids) == 1]
        prefills = [c for c in chunks if len(c.token_ids) > 1]
        ordered = decodes + prefills
        ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        first_rows: dict[str, int] = {}
        for chunk in ordered:
            first_rows[chunk.request_id] = len(ids)
            ids.extend(chunk.token_ids)
            positions.extend(chunk.lookahead.positions(chunk.start_pos) if chunk.lookahead
                             else range(chunk.start_pos, chunk.context_len))
            if chunk.sample and not chunk.speculates:
                sample_rows.append(len(ids) - 1)
        position_tensor = self._tensor(positions)
        lengths = [len(c.token_ids) for c in ordered]
        tables = self._padded_tables(ordered)  # [C, W]
        slots = self._slots(tables, lengths, self._slot_positions(ordered, position_tensor))
        if self.paged:
            meta = AttentionMetadata(slot_mapping=slots, paged=self._paged_batch(ordered, tables, lengths))
        else:
            meta = AttentionMetadata(slot_mapping=slots,
                                     decode=self._decode_group(decodes, tables[:len(decodes)]) if decodes else None,
                                     prefills=self._prefill_segments(prefills, len(decodes)))
        return StepInput(self._tensor(ids), position_tensor, meta, self._tensor(sample_rows),
                         tuple(c for c in ordered if c.sample and not c.speculates), first_rows,
                         tuple(c for c in ordered if c.speculates))

    def _slot_positions(self, chunks: list[ScheduledChunk], positions: torch.Tensor) -> torch.Tensor:
        """[T] the position whose slot each token's KV goes to: its own, except in a lookahead chunk, whose tokens
        claim other positions (`engine.lookahead`) but take the slots after the input in the chunk's order."""
        if not any(c.lookahead for c in chunks):
            return positions
        return self._tensor([p for c in chunks for p in range(c.start_pos, c.context_len)])

    def _slots(self, tables: torch.Tensor, lengths: list[int], positions: torch.Tensor) -> torch.Tensor:
        """[T] each token's slot, block_table[pos // BS] * BS + pos % BS, computed on the device.

        tables: [C, W] each chunk's blocks; lengths: each chunk's token count; positions: [T]."""
        block_size = self.kv_cache.block_size
        chunk_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=self.device),
                                                 self._tensor(lengths))  # [T]
        blocks = tables[chunk_of_token, positions // block_size]
        return blocks * block_size + positions % block_size

    def _paged_batch(self, ordered: list[ScheduledChunk], tables: torch.Tensor, lengths: list[int]) -> PagedBatch:
        starts = [0]
        for length in lengths:
            starts.append(starts[-1] + length)
        return PagedBatch(query_starts=self._tensor(starts, torch.int32),
                          context_lens=self._tensor([c.context_len for c in ordered], torch.int32),
                          block_tables=tables.to(torch.int32), max_query_len=max(lengths))

    def _padded_tables(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """[C, W] each chunk's block ids, padded with 0 to the longest."""
        width = max(len(c.block_ids) for c in chunks)
        return self._tensor([list(c.block_ids) + [0] * (width - len(c.block_ids)) for c in chunks])

    def _decode_group(self, decodes: list[ScheduledChunk], tables: torch.Tensor) -> DecodeGroup:
        """tables: [B, W'] the decoding chunks' rows of the step's block tables (padded maybe wider than theirs)."""
        block_size = self.kv_cache.block_size
        tables = tables[:, :max(len(c.block_ids) for c in decodes)]  # [B, W]
        lengths = self._tensor([c.context_len for c in decodes])
        padding = torch.arange(tables.shape[1] * block_size, device=self.device)[None, :] >= lengths[:, None]
        key_mask = torch.zeros(padding.shape, dtype=self.kv_cache.tensor.dtype, device=self.device)  # [B, S]
        key_mask.masked_fill_(padding, float("-inf"))
        return DecodeGroup(size=len(decodes), block_tables=tables, key_mask=key_mask[:, None, None, :])

    def _prefill_segments(self, prefills: list[ScheduledChunk], first_row: int) -> tuple[PrefillSegment, ...]:
        segments = []
        row = first_row
        for chunk in prefills:
            length = len(chunk.token_ids)
            mask = None
            if chunk.lookahead is not None:  # the context, then each token's own causal path in the chunk
                mask = torch.cat([torch.ones(length, chunk.start_pos, dtype=torch.bool),
                                  chunk.lookahead.mask()], dim=1).to(self.device)  # [Q, S]
            elif chunk.start_pos > 0:
                queries = torch.arange(chunk.start_pos, chunk.context_len, device=self.device)
                keys = torch.arange(chunk.context_len, device=self.device)
                mask = keys[None, :] <= queries[:, None]  # [Q, S]
            blocks = -(-chunk.context_len // self.kv_cache.block_size)
            segments.append(PrefillSegment(row=row, length=length, start_pos=chunk.start_pos,
                                           block_ids=self._tensor(chunk.block_ids[:blocks]), mask=mask))
            row += length
        return tuple(segments)

    def _tensor(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """A host list on the device: through pinned memory on CUDA, so the copy does not block the host."""
        if self.device.type == "cpu":
            return torch.tensor(values, dtype=dtype)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)
