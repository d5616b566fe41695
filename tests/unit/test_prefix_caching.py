"""Prefix caching: the block hash chain, BlockManager's cached blocks and events, and the scheduler's reuse."""

import pytest

from pdserve.engine.block_manager import BlockError, BlockManager, CacheEvents
from pdserve.engine.prefix_hash import ROOT, block_hashes, chain_hash, shareable_blocks
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from tests.unit.test_scheduler import fake_token, run_to_end, step

BS = 4  # tokens per block
PROMPT = tuple(range(1, 11))  # 10 tokens: two full blocks and a partial one


def manager(num_blocks: int, caching: bool = True) -> BlockManager:
    """A BlockManager that keeps its cache events (as a worker publishing them does)."""
    blocks = BlockManager(num_blocks, BS, caching)
    blocks.record_events = True
    return blocks


def make(num_blocks: int = 12, budget: int = 64, max_seqs: int = 8) -> tuple[BlockManager, Scheduler]:
    blocks = manager(num_blocks)
    return blocks, Scheduler(blocks, max_num_batched_tokens=budget, max_num_seqs=max_seqs)


def req(order: int, prompt, max_tokens: int = 1) -> Request:
    return Request(f"r{order}", tuple(prompt), SamplingParams(max_tokens=max_tokens), order)


def serve(sched: Scheduler, request: Request) -> list[int]:
    """Run one request alone to the end; its block ids."""
    sched.add(request)
    held = list(step(sched, request).chunks[0].block_ids)
    run_to_end(sched, request)
    return held


# ---- prefix_hash --------------------------------------------------------------------------------------------------
def test_chain_hash_depends_on_parent_and_tokens_and_is_stable():
    h = chain_hash(ROOT, [1, 2, 3, 4])
    assert h == chain_hash(ROOT, (1, 2, 3, 4)) and 0 <= h < 2**64
    assert h != chain_hash(ROOT, [1, 2, 3, 5])
    assert h != chain_hash(h, [1, 2, 3, 4])


def test_block_hashes_name_only_full_blocks_and_chain_them():
    hashes = block_hashes(PROMPT, BS)
    assert len(hashes) == 2 and len(block_hashes(PROMPT[:3], BS)) == 0
    assert hashes == [chain_hash(ROOT, PROMPT[:4]), chain_hash(hashes[0], PROMPT[4:8])]
    assert block_hashes(PROMPT, BS, start=1, parent=hashes[0]) == hashes[1:]
    changed_head = block_hashes((99,) + PROMPT[1:], BS)
    assert changed_head[0] != hashes[0] and changed_head[1] != hashes[1]  # same block 1 tokens, other prefix


def test_shareable_blocks_always_leave_the_last_token():
    assert [shareable_blocks(n, BS) for n in (0, 1, 4, 5, 8, 9, 10)] == [0, 0, 0, 1, 1, 2, 2]


# ---- BlockManager -------------------------------------------------------------------------------------------------
def test_registered_block_stays_cached_and_free_after_its_user_frees_it():
    blocks = manager(4)
    (b,) = blocks.allocate(1)
    blocks.register(b, 111)
    blocks.free([b])
    assert (blocks.num_used, blocks.num_free, blocks.num_cached) == (0, 4, 1)
    assert blocks.cached_prefix([111]) == [b]
    assert blocks.evictable_among([b]) == 1


def test_cached_prefix_stops_at_first_miss():
    blocks = manager(6)
    ids = blocks.allocate(3)
    for block_id, h in zip(ids, (1, 2, 3)):
        blocks.register(block_id, h)
    assert blocks.cached_prefix([1, 2, 3, 4]) == ids
    assert blocks.cached_prefix([1, 9, 3]) == ids[:1]
    assert blocks.cached_prefix([2, 3]) == ids[1:]  # a hash names its block wherever the run starts
    assert blocks.cached_prefix([9, 1]) == []


def test_share_counts_references_and_takes_block_out_of_free():
    blocks = manager(4)
    (b,) = blocks.allocate(1)
    blocks.register(b, 7)
    blocks.share([b])  # a second user while the first holds it
    blocks.free([b])
    assert (blocks.num_used, blocks.evictable_among([b])) == (1, 0)
    blocks.free([b])
    assert (blocks.num_used, blocks.num_free) == (0, 4)
    blocks.share([b])  # taken back from the evictable set
    assert (blocks.num_used, blocks.num_free, blocks.evictable_among([b])) == (1, 3, 0)


def test_allocate_prefers_plain_free_blocks_then_evicts_least_recently_freed():
    blocks = manager(4)
    ids = blocks.allocate(4)
    for block_id, h in zip(ids[:3], (10, 20, 30)):
        blocks.register(block_id, h)
    blocks.free(reversed(ids))  # plain ids[3], then cached ids[2], ids[1], ids[0] in that order
    blocks.take_events()
    assert blocks.allocate(1) == [ids[3]] and blocks.evictions == 0
    assert blocks.allocate(2) == [ids[2], ids[1]]
    assert blocks.evictions == 2 and blocks.num_cached == 1
    assert blocks.cached_prefix([10, 20, 30]) == [ids[0]]
    assert blocks.take_events() == CacheEvents(stored=(), evicted=(30, 20))


def test_take_events_reports_in_order_then_clears():
    blocks = manager(2)
    a, b = blocks.allocate(2)
    blocks.register(a, 5)
    blocks.register(b, 6)
    events = blocks.take_events()
    assert events == CacheEvents(stored=(5, 6)) and events
    assert not blocks.take_events()


def test_events_are_kept_only_when_recording():
    blocks = BlockManager(1, BS)
    (b,) = blocks.allocate(1)
    blocks.register(b, 5)
    blocks.free([b])
    blocks.allocate(1)  # evicts 5
    assert not blocks.take_events() and blocks.evictions == 1
    blocks.free([b])
    blocks.record_events = True
    blocks.allocate(1)
    blocks.register(b, 6)
    assert blocks.cached_hashes() == [6] and blocks.take_events() == CacheEvents(stored=(6,))


def test_same_hash_in_second_block_keeps_the_first_and_second_stays_private():
    blocks = manager(2)
    a, b = blocks.allocate(2)
    blocks.register(a, 5)
    blocks.register(b, 5)
    blocks.register(a, 6)  # a block is named once
    assert blocks.cached_prefix([5]) == [a] and blocks.cached_prefix([6]) == []
    assert blocks.take_events().stored == (5,)
    blocks.free([b])
    with pytest.raises(BlockError):
        blocks.share([b])


def test_misuse_raises_block_error():
    blocks = manager(2)
    with pytest.raises(BlockError, match="registered but not in use"):
        blocks.register(0, 5)
    with pytest.raises(BlockError, match="shared but not cached"):
        blocks.share([1])
    (b,) = blocks.allocate(1)
    blocks.register(b, 5)
    blocks.free([b])
    with pytest.raises(BlockError, match="freed but not allocated"):
        blocks.free([b])  # cached but nobody holds it


def test_caching_off_registers_nothing():
    blocks = manager(2, caching=False)
    (b,) = blocks.allocate(1)
    blocks.register(b, 5)
    blocks.free([b])
    assert (blocks.num_cached, blocks.cached_prefix([5]), blocks.evictable_among([b])) == (0, [], 0)
    assert not blocks.take_events()
    blocks.allocate(2)
    assert blocks.evictions == 0


# ---- Scheduler with caching ---------------------------------------------------------------------------------------
def test_second_request_starts_at_first_uncached_token():
    blocks, sched = make()
    first = serve(sched, req(0, PROMPT))
    b = req(1, PROMPT)
    sched.add(b)
    (chunk,) = step(sched, b).chunks
    assert (chunk.start_pos, chunk.token_ids, b.num_cached_tokens) == (8, PROMPT[8:], 8)
    assert list(chunk.block_ids[:2]) == first[:2] and chunk.block_ids[2] not in first[:2]
    run_to_end(sched, b)
    assert blocks.num_used == 0


def test_prompt_of_whole_blocks_shares_one_block_fewer():
    _, sched = make()
    serve(sched, req(0, PROMPT[:8]))
    b = req(1, PROMPT[:8])
    sched.add(b)
    (chunk,) = step(sched, b).chunks
    assert (chunk.start_pos, chunk.token_ids, b.num_cached_tokens) == (4, PROMPT[4:8], 4)


def test_only_full_blocks_are_shared_and_a_differing_block_ends_the_hit():
    blocks, sched = make()
    serve(sched, req(0, PROMPT))  # 10 tokens computed: block 2 (tokens 8, 9) is partial
    assert blocks.num_cached == 2
    longer = req(1, PROMPT + (50, 51, 52, 53))
    differs = req(2, PROMPT[:4] + (77,) + PROMPT[5:])
    sched.add(longer)
    sched.add(differs)
    out = step(sched, longer, differs)
    assert [c.start_pos for c in out.chunks] == [8, 4]
    assert (longer.num_cached_tokens, differs.num_cached_tokens) == (8, 4)


def test_blocks_register_as_chunks_complete():
    blocks, sched = make(budget=8)
    a = req(0, tuple(range(1, 21)), max_tokens=2)
    sched.add(a)
    step(sched, a)
    assert blocks.take_events().stored == tuple(block_hashes(a.prompt_token_ids[:8], BS))
    assert a.num_registered_blocks == 2
    step(sched, a)
    assert blocks.take_events().stored == tuple(block_hashes(a.prompt_token_ids[:16], BS))[2:]
    step(sched, a)  # the last 4 prompt tokens complete block 4
    assert a.num_registered_blocks == 5 and blocks.num_cached == 5


def test_blocks_filled_by_output_tokens_are_registered_and_shared():
    blocks, sched = make()
    a = req(0, PROMPT[:6], max_tokens=4)  # computes 6 prompt + 3 output tokens: block 1 = 2 prompt + 2 output
    serve(sched, a)
    assert blocks.num_cached == 2
    b = req(1, a.all_token_ids[:8] + [999])
    sched.add(b)
    (chunk,) = step(sched, b).chunks
    assert (chunk.start_pos, chunk.token_ids, b.num_cached_tokens) == (8, (999,), 8)


def test_concurrent_same_prefix_computes_twice_and_keeps_the_first_blocks():
    blocks, sched = make()
    a, b = req(0, PROMPT), req(1, PROMPT)
    sched.add(a)
    sched.add(b)
    out = step(sched, a, b)
    assert [c.start_pos for c in out.chunks] == [0, 0]
    a_blocks = list(out.chunks[0].block_ids)
    assert blocks.num_cached == 2 and len(blocks.take_events().stored) == 2
    assert blocks.num_used == 0 and blocks.num_free == 12
    c = req(2, PROMPT)
    sched.add(c)
    assert list(step(sched, c).chunks[0].block_ids[:2]) == a_blocks[:2]


def test_preempted_request_retakes_its_own_cached_blocks():
    blocks, sched = make(num_blocks=4)
    a, b = req(0, PROMPT[:6], max_tokens=2), req(1, tuple(range(40, 48)), max_tokens=3)
    sched.add(a)
    sched.add(b)
    b_blocks = list(step(sched, a, b).chunks[1].block_ids)
    out = step(sched, a, b)  # b needs a third block and is the newest
    assert out.preempted == ("r1",) and b.num_registered_blocks == 0
    out = step(sched, a, b)
    (chunk,) = out.chunks
    assert (chunk.request_id, chunk.start_pos, chunk.token_ids) == ("r1", 8, (b.output_token_ids[0],))
    assert list(chunk.block_ids[:2]) == b_blocks
    assert b.num_cached_tokens == 0  # its prompt was computed, not found
    run_to_end(sched, a, b)
    assert blocks.num_used == 0


def test_admission_counts_shared_evictable_blocks_as_taken():
    blocks, sched = make(num_blocks=3)
    serve(sched, req(0, PROMPT))  # 2 cached evictable blocks + 1 plain free block
    hog = req(1, (7, 7, 7), max_tokens=5)
    sched.add(hog)
    step(sched, hog)  # takes the plain free block
    b = req(2, PROMPT)
    sched.add(b)
    out = step(sched, hog, b)  # sharing 2 leaves no block for b's third one: it waits, holding nothing
    assert [c.request_id for c in out.chunks] == ["r1"]
    assert b.status is RequestStatus.WAITING and b.block_ids == [] and blocks.num_used == 1
    assert not sched.reserve(req(3, PROMPT))
    assert blocks.num_used == 1 and not sched.held


def test_reserve_shares_cached_prefix_and_commit_registers_received_blocks():
    blocks, sched = make()
    first = serve(sched, req(0, PROMPT))
    blocks.take_events()
    r = req(1, PROMPT[:8] + (60, 61, 62, 63, 64, 65), max_tokens=2)
    assert sched.reserve(r)
    assert (r.num_cached_tokens, r.block_ids[:2], len(r.block_ids), blocks.num_used) == (8, first[:2], 4, 4)
    r.num_computed_tokens = r.num_tokens  # the rest of the KV arrived
    r.output_token_ids.append(fake_token(r))
    sched.commit(r)
    assert blocks.take_events().stored == tuple(block_hashes(r.prompt_token_ids, BS))[2:]
    assert r.num_registered_blocks == 3
    run_to_end(sched, r)
    assert blocks.num_used == 0


def test_evicted_block_is_never_found_again():
    blocks, sched = make(num_blocks=3)
    first = serve(sched, req(0, PROMPT))  # frees its plain block 2, then cached 1, then cached 0
    blocks.take_events()
    other = req(1, (5, 5, 5, 5, 5), max_tokens=3)
    sched.add(other)
    step(sched, other)  # 2 blocks: the plain free one, then evicts the prefix's tail (block 1)
    assert blocks.evictions == 1
    assert blocks.take_events().evicted == tuple(block_hashes(PROMPT, BS))[1:]
    assert blocks.cached_prefix(block_hashes(PROMPT, BS)) == first[:1]
    run_to_end(sched, other)
    b = req(2, PROMPT)
    sched.add(b)
    (chunk,) = step(sched, b).chunks
    assert (chunk.start_pos, b.num_cached_tokens, chunk.block_ids[0]) == (4, 4, first[0])


def test_no_leak_after_mixed_requests_and_cache_stays_free():
    blocks, sched = make(num_blocks=10, budget=12)
    requests = [req(i, PROMPT[:4 + i] + (i,) * 3, max_tokens=3 + i % 2) for i in range(5)]
    for r in requests:
        sched.add(r)
    run_to_end(sched, *requests)
    assert blocks.num_used == 0 and blocks.num_free == 10 and blocks.num_cached > 0
    assert sum(r.num_cached_tokens for r in requests) > 0


def test_caching_off_scheduler_never_shares():
    blocks = BlockManager(12, BS, caching=False)
    sched = Scheduler(blocks, max_num_batched_tokens=64, max_num_seqs=8)
    serve(sched, req(0, PROMPT))
    b = req(1, PROMPT)
    sched.add(b)
    (chunk,) = step(sched, b).chunks
    assert (chunk.start_pos, b.num_cached_tokens, b.num_registered_blocks, blocks.num_cached) == (0, 0, 0, 0)
