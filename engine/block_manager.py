"""KV block bookkeeping: which blocks of the cache are in use, cached or free. Pure Python, no torch.

A block id is a full address into the worker's KV tensor `[2, layers, blocks, block_size, kv_heads, head_dim]`, so a
request's KV is the list of its block ids. Check/act pairs: `can_allocate(n)` then `allocate(n)`; `free(ids)`.
Freeing a block that is not in use is a bug in the caller and raises, so leaks and double frees surface in tests.

Prefix caching: a full block whose KV is computed can be `register`ed under its hash (`engine.prefix_hash`). Blocks
are reference counted; a registered block whose last user frees it stays cached (evictable) instead of free, and a
later request with the same prefix takes it back with `share` (`cached_prefix` finds them). When no plain free block
is left, `allocate` evicts cached blocks, least recently freed first, and forgets their hashes, so an evicted block
is never found (nor read) again. With `record_events` on, every registration and eviction is kept for KV-aware
routing (`take_events`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class BlockError(RuntimeError):
    """A block was freed twice, never allocated, or shared while not cached."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


@dataclass(frozen=True)
class CacheEvents:
    """Block hashes this cache gained (`stored`) and lost (`evicted`) since the last `take_events`, each hash by its
    last change only (a block evicted and cached again since is `stored`), so the two never share a hash."""

    stored: tuple[int, ...] = ()
    evicted: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.stored or self.evicted)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._free: deque[int] = deque(range(num_blocks))
        self._refs: dict[int, int] = {}
        """Blocks in use -> how many requests hold each."""
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Cached blocks nobody holds, least recently freed first."""
        self._block_of: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self.record_events = False
        """Keep what was cached and evicted for `take_events` (a worker that publishes them turns this on)."""
        self._changes: dict[int, bool] = {}
        """Hash -> cached (True) or evicted (False), its latest change since the last `take_events`."""
        self.evictions = 0
        """Cached blocks reused for other KV since the start."""

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out: plain free ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Blocks with a registered hash, held or not."""
        return len(self._block_of)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise BlockError(f"asked for {n} blocks, {self.num_free} free")
        ids = [self._free.popleft() if self._free else self._evict() for _ in range(n)]
        for block_id in ids:
            self._refs[block_id] = 1
        return ids

    def free(self, ids: Iterable[int]) -> None:
        """Drop one reference to each block. Pass a request's blocks last-first, so that a prefix's tail is
        evicted before its head."""
        for block_id in ids:
            refs = self._refs.get(block_id)
            if refs is None:
                raise BlockError(f"block {block_id} freed but not allocated")
            if refs > 1:
                self._refs[block_id] = refs - 1
                continue
            del self._refs[block_id]
            if block_id in self._hash_of:
                self._evictable[block_id] = None
            else:
                self._free.append(block_id)

    def blocks_to_grow(self, held: int, num_tokens: int) -> int:
        """Extra blocks a request holding `held` blocks needs to store `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - held)

    # ---- prefix caching ----------------------------------------------------------------------------------------
    def cached_prefix(self, hashes: Sequence[int]) -> list[int]:
        """The cached blocks for the longest leading run of `hashes` (no reference taken)."""
        found = []
        for block_hash in hashes if self.caching else ():
            block_id = self._block_of.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def evictable_among(self, ids: Iterable[int]) -> int:
        """How many of `ids` nobody holds: sharing them takes them out of `num_free`."""
        return sum(1 for block_id in ids if block_id in self._evictable)

    def share(self, ids: Iterable[int]) -> None:
        """Take a reference to each cached block (found by `cached_prefix`)."""
        for block_id in ids:
            if block_id not in self._hash_of:
                raise BlockError(f"block {block_id} shared but not cached")
            if block_id in self._evictable:
                del self._evictable[block_id]
                self._refs[block_id] = 1
            else:
                self._refs[block_id] += 1

    def register(self, block_id: int, block_hash: int) -> None:
        """A used block's KV is complete and named `block_hash`. A hash cached already in another block (two
        requests computed the same prefix at once) keeps its first block; this one stays private."""
        if not self.caching or block_hash in self._block_of or block_id in self._hash_of:
            return
        if block_id not in self._refs:
            raise BlockError(f"block {block_id} registered but not in use")
        self._block_of[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        if self.record_events:
            self._changes[block_hash] = True

    def cached_hashes(self) -> list[int]:
        """Every hash cached now, held or not."""
        return list(self._block_of)

    def take_events(self) -> CacheEvents:
        events = CacheEvents(tuple(h for h, cached in self._changes.items() if cached),
                             tuple(h for h, cached in self._changes.items() if not cached))
        self._changes.clear()
        return events

    def _evict(self) -> int:
        block_id, _ = self._evictable.popitem(last=False)
        block_hash = self._hash_of.pop(block_id)
        del self._block_of[block_hash]
        if self.record_events:
            self._changes[block_hash] = False
        self.evictions += 1
        return block_id
