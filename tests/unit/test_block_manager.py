"""BlockManager bookkeeping: allocate/free/can_allocate, blocks_for, blocks_to_grow and BlockError on misuse."""

import pytest

from pdserve.engine.block_manager import BlockError, BlockManager, blocks_for


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 4) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]
    assert blocks_for(7, 1) == 7


def test_allocate_and_free_update_counts():
    blocks = BlockManager(num_blocks=12, block_size=4)
    assert (blocks.num_free, blocks.num_used) == (12, 0)
    first = blocks.allocate(5)
    second = blocks.allocate(3)
    assert len(first) == 5 and len(second) == 3
    assert not set(first) & set(second)
    assert set(first) | set(second) <= set(range(12))
    assert (blocks.num_free, blocks.num_used) == (4, 8)
    blocks.free(first)
    assert (blocks.num_free, blocks.num_used) == (9, 3)
    blocks.free(second)
    assert (blocks.num_free, blocks.num_used) == (12, 0)


def test_freed_blocks_can_be_allocated_again():
    blocks = BlockManager(num_blocks=4, block_size=4)
    ids = blocks.allocate(4)
    blocks.free(ids[:2])
    again = blocks.allocate(2)
    assert sorted(again) == sorted(ids[:2])
    assert blocks.num_free == 0


def test_allocate_zero_is_empty():
    blocks = BlockManager(num_blocks=2, block_size=4)
    assert blocks.allocate(0) == []
    assert blocks.num_used == 0


def test_can_allocate():
    blocks = BlockManager(num_blocks=12, block_size=4)
    assert blocks.can_allocate(0) and blocks.can_allocate(12)
    assert not blocks.can_allocate(13)
    blocks.allocate(10)
    assert blocks.can_allocate(2)
    assert not blocks.can_allocate(3)


def test_allocate_more_than_free_raises_and_changes_nothing():
    blocks = BlockManager(num_blocks=12, block_size=4)
    blocks.allocate(10)
    with pytest.raises(BlockError, match="3 blocks, 2 free"):
        blocks.allocate(3)
    assert (blocks.num_free, blocks.num_used) == (2, 10)


def test_double_free_raises():
    blocks = BlockManager(num_blocks=12, block_size=4)
    ids = blocks.allocate(2)
    blocks.free(ids)
    with pytest.raises(BlockError, match=f"block {ids[0]} freed but not allocated"):
        blocks.free(ids)
    assert blocks.num_free == 12


def test_freeing_unallocated_block_raises():
    blocks = BlockManager(num_blocks=12, block_size=4)
    blocks.allocate(2)
    with pytest.raises(BlockError):
        blocks.free([11])
    with pytest.raises(BlockError):
        blocks.free([99])
    assert blocks.num_used == 2


def test_blocks_to_grow():
    blocks = BlockManager(num_blocks=12, block_size=4)
    assert blocks.blocks_to_grow(held=0, num_tokens=1) == 1
    assert blocks.blocks_to_grow(held=2, num_tokens=8) == 0
    assert blocks.blocks_to_grow(held=2, num_tokens=9) == 1
    assert blocks.blocks_to_grow(held=1, num_tokens=13) == 3
    assert blocks.blocks_to_grow(held=5, num_tokens=4) == 0  # never negative


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4)])
def test_bad_sizes_raise(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)
