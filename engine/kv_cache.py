"""The worker's one KV tensor and the per-step attention metadata that addresses it.

Layout: `[2, layers, blocks, block_size, kv_heads, head_dim]` (k then v). A token's slot is
`block_id * block_size + offset`, so a request's KV is fully named by its block ids, and moving KV between workers
is copying whole blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.config import ModelConfig


class KVCache:
    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # [2, L, NB, BS, KVH, D]
        self.tensor = torch.zeros(2, model.num_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim,
                                  dtype=dtype, device=device)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block (all layers, K and V): what a transfer of it moves."""
        return self.tensor[:, :, 0].numel() * self.tensor.element_size()

    @staticmethod
    def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * element

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of one layer, each [NB, BS, KVH, D] (views into the one tensor)."""
        return self.tensor[0, index], self.tensor[1, index]

    def read_blocks(self, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of the given blocks: [2, L, len(block_ids), BS, KVH, D], into `out` when given."""
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.tensor.device)
        if out is None:
            return self.tensor.index_select(2, index)
        return torch.index_select(self.tensor, 2, index, out=out)

    def copy_slots(self, source: Sequence[int], target: Sequence[int]) -> None:
        """Copy the KV (all layers, K and V) in the `source` slots to the `target` slots."""
        flat = self.tensor.flatten(2, 3)  # [2, L, NB * BS, KVH, D], a view
        index = torch.tensor(list(source), dtype=torch.long, device=self.tensor.device)
        flat[:, :, torch.tensor(list(target), dtype=torch.long, device=self.tensor.device)] = flat[:, :, index]

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Write `data` ([2, L, len(block_ids), BS, KVH, D]) into the given blocks."""
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.tensor.device)
        self.tensor.index_copy_(2, index, data.to(device=self.tensor.device, dtype=self.tensor.dtype))


@dataclass(frozen=True)
class DecodeGroup:
    """Requests computing one query token each: rows [0, size) of the step's tokens."""

    size: int
    block_tables: torch.Tensor
    """[B, max_blocks] block ids, padded with 0."""
    key_mask: torch.Tensor
    """[B, 1, 1, max_blocks * BS] additive (0 for real context, -inf for padding), built once per step."""


@dataclass(frozen=True)
class PrefillSegment:
    """One request's chunk of several query tokens: rows [row, row + length) of the step's tokens."""

    row: int
    length: int
    start_pos: int
    block_ids: torch.Tensor
    """[num_blocks] the request's blocks, covering start_pos + length tokens."""
    mask: torch.Tensor | None
    """[length, start_pos + length] bool (query may see key) when start_pos > 0; None means plain causal."""


@dataclass(frozen=True)
class PagedBatch:
    """Every chunk of the step for the paged kernels (engine.triton_attention), which read the block tables directly.

    Chunk s owns query rows [query_starts[s], query_starts[s + 1]); its queries are the last tokens of its
    context_lens[s] tokens of context."""

    query_starts: torch.Tensor
    """[S + 1] int32 row offsets."""
    context_lens: torch.Tensor
    """[S] int32 tokens of context, this chunk's own included."""
    block_tables: torch.Tensor
    """[S, W] int32 block ids (padded with 0)."""
    max_query_len: int
    """The longest chunk (sizes the kernel's grid)."""


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[T] where each new token's k and v are written (the paged kernels skip a negative slot)."""
    decode: DecodeGroup | None = None
    """The torch path's decoding requests."""
    prefills: tuple[PrefillSegment, ...] = ()
    """The torch path's prefill chunks."""
    paged: PagedBatch | None = None
    """Set instead of decode/prefills when the paged kernels run the step."""
