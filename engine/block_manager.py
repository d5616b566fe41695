"""KV block bookkeeping: which blocks of the cache are free. Pure Python, no torch.

A block id is a full address into the worker's KV tensor `[2, layers, blocks, block_size, kv_heads, head_dim]`, so a
request's KV is the list of its block ids. Check/act pairs: `can_allocate(n)` then `allocate(n)`; `free(ids)`.
Freeing a block that is not allocated is a bug in the caller and raises, so leaks and double frees surface in tests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class BlockError(RuntimeError):
    """A block was freed twice or never allocated."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise BlockError(f"asked for {n} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: Iterable[int]) -> None:
        for block_id in ids:
            if block_id not in self._used:
                raise BlockError(f"block {block_id} freed but not allocated")
            self._used.remove(block_id)
            self._free.append(block_id)

    def blocks_to_grow(self, held: int, num_tokens: int) -> int:
        """Extra blocks a request holding `held` blocks needs to store `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - held)
