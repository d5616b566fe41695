"""Names for full KV blocks: a hash chain over token ids, so equal prefixes get equal names on every worker.

Block i's hash covers block i-1's hash and block i's own `block_size` token ids, so it names the whole prefix up to
the end of block i: two requests share block i's KV exactly when their first (i+1) * block_size tokens are equal.
The hash is a stable 64-bit digest (blake2b), the same in every process, so a router computes the names a worker
registered without asking it. Only full blocks are named; a partial last block is never shared.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT = 0
"""The parent of a sequence's first block."""


def chain_hash(parent: int, token_ids: Sequence[int]) -> int:
    """The hash of a block holding `token_ids` whose previous block's hash is `parent`."""
    digest = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, start: int = 0, parent: int = ROOT) -> list[int]:
    """Hashes of the full blocks of `token_ids` from block `start` on (whose previous block's hash is `parent`)."""
    hashes = []
    for first in range(start * block_size, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, token_ids[first:first + block_size])
        hashes.append(parent)
    return hashes


def shareable_blocks(num_tokens: int, block_size: int) -> int:
    """How many leading blocks of a `num_tokens`-token prompt may come from a cache: the full blocks, less the one
    holding the last token, so that some of the prompt is always computed (to sample the first token) and sent."""
    return max(0, (num_tokens - 1) // block_size)
