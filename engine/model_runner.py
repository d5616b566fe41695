"""Execute one scheduled step: build the flat token batch and attention metadata, run the model, sample.

Chunks of one token (decoding requests) go first and share one batched attention call; longer chunks (prefills)
follow, one attention call each. Only the rows that sample a token go through the final norm and the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.kv_cache import AttentionMetadata, DecodeGroup, KVCache, PrefillSegment
from pdserve.engine.model import LlamaModel
from pdserve.engine.sampler import Sampler
from pdserve.engine.scheduler import ScheduledChunk


@dataclass(frozen=True)
class StepInput:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [N] row of each sampling chunk's last token
    sample_chunks: tuple[ScheduledChunk, ...]


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, sampler: Sampler) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.device = kv_cache.tensor.device

    @torch.inference_mode()
    def run(self, chunks: tuple[ScheduledChunk, ...]) -> dict[str, int]:
        """Compute the chunks; return the sampled token of each chunk that samples."""
        step = self.prepare(chunks)
        hidden = self.model(step.input_ids, step.positions, self.kv_cache, step.meta)  # [T, hidden]
        if not step.sample_chunks:
            return {}
        logits = self.model.logits(hidden[step.sample_rows])  # [N, V]
        tokens = self.sampler.sample(logits, [c.sampling for c in step.sample_chunks],
                                     [c.output_index for c in step.sample_chunks])
        return {c.request_id: t for c, t in zip(step.sample_chunks, tokens)}

    def prepare(self, chunks: tuple[ScheduledChunk, ...]) -> StepInput:
        decodes = [c for c in chunks if len(c.token_ids) == 1]
        prefills = [c for c in chunks if len(c.token_ids) > 1]
        ordered = decodes + prefills
        block_size = self.kv_cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        for chunk in ordered:
            ids.extend(chunk.token_ids)
            for pos in range(chunk.start_pos, chunk.context_len):
                positions.append(pos)
                slots.append(chunk.block_ids[pos // block_size] * block_size + pos % block_size)
            if chunk.sample:
                sample_rows.append(len(ids) - 1)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            decode=self._decode_group(decodes) if decodes else None,
            prefills=self._prefill_segments(prefills, len(decodes)),
        )
        return StepInput(self._tensor(ids), self._tensor(positions), meta, self._tensor(sample_rows),
                         tuple(c for c in ordered if c.sample))

    def _decode_group(self, decodes: list[ScheduledChunk]) -> DecodeGroup:
        block_size = self.kv_cache.block_size
        width = max(len(c.block_ids) for c in decodes)
        tables = [list(c.block_ids) + [0] * (width - len(c.block_ids)) for c in decodes]
        lengths = self._tensor([c.context_len for c in decodes])
        padding = torch.arange(width * block_size, device=self.device)[None, :] >= lengths[:, None]  # [B, S]
        key_mask = torch.zeros(padding.shape, dtype=self.kv_cache.tensor.dtype, device=self.device)
        key_mask.masked_fill_(padding, float("-inf"))
        return DecodeGroup(size=len(decodes), block_tables=self._tensor(tables), key_mask=key_mask[:, None, None, :])

    def _prefill_segments(self, prefills: list[ScheduledChunk], first_row: int) -> tuple[PrefillSegment, ...]:
        segments = []
        row = first_row
        for chunk in prefills:
            length = len(chunk.token_ids)
            mask = None
            if chunk.start_pos > 0:
                queries = torch.arange(chunk.start_pos, chunk.context_len, device=self.device)
                keys = torch.arange(chunk.context_len, device=self.device)
                mask = keys[None, :] <= queries[:, None]  # [Q, S]
            blocks = -(-chunk.context_len // self.kv_cache.block_size)
            segments.append(PrefillSegment(row=row, length=length, start_pos=chunk.start_pos,
                                           block_ids=self._tensor(chunk.block_ids[:blocks]), mask=mask))
            row += length
        return tuple(segments)

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
