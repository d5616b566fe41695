"""KV-aware routing without Redis: KVIndex over CacheBatches, pick_decode/pick_prefill with an Affinity, and the
worker's CacheEventPublisher driving a real BlockManager into a fake event log."""

import redis

from pdserve.engine.block_manager import BlockManager
from pdserve.registry.entries import Role, WorkerInfo, WorkerState
from pdserve.registry.kv_events import CacheBatch
from pdserve.router.kv_index import EXPECT_S, KVIndex
from pdserve.router.policy import Affinity, pick_decode, pick_prefill
from pdserve.worker.cache_events import CacheEventPublisher

# ---- KVIndex ----------------------------------------------------------------------------------------------------


def test_apply_stored_then_evicted_updates_holders():
    index = KVIndex()
    index.apply(CacheBatch("w0", stored=(1, 2, 3)))
    index.apply(CacheBatch("w1", stored=(1,)))
    assert index.cached_blocks([1, 2, 3], ["w0", "w1"]) == {"w0": 3, "w1": 1}
    index.apply(CacheBatch("w0", evicted=(3,)))
    assert index.cached_blocks([1, 2, 3], ["w0", "w1"]) == {"w0": 2, "w1": 1}
    assert index.batches_applied == 3


def test_reset_forgets_the_workers_earlier_blocks_only():
    index = KVIndex()
    index.apply(CacheBatch("w0", stored=(1, 2)))
    index.apply(CacheBatch("w1", stored=(1, 2)))
    index.apply(CacheBatch("w0", stored=(7,), reset=True))
    assert index.cached_blocks([1, 2], ["w0", "w1"]) == {"w0": 0, "w1": 2}
    assert index.cached_blocks([7], ["w0", "w1"]) == {"w0": 1, "w1": 0}


def test_forget_drops_every_block_of_a_worker():
    index = KVIndex()
    index.apply(CacheBatch("w0", stored=(1, 2)))
    index.apply(CacheBatch("w1", stored=(2,)))
    index.forget("w0")
    assert index.cached_blocks([1, 2], ["w0"]) == {"w0": 0}
    assert index.cached_blocks([2], ["w1"]) == {"w1": 1}
    assert index.num_blocks == 1
    index.forget("nobody")  # unknown worker: nothing happens
    assert index.num_blocks == 1


def test_cached_blocks_counts_only_the_leading_run_per_worker():
    index = KVIndex()
    index.apply(CacheBatch("full", stored=(1, 2, 3, 4)))
    index.apply(CacheBatch("holed", stored=(1, 2, 4)))  # block 3 missing: block 4 does not count
    index.apply(CacheBatch("tail", stored=(2, 3, 4)))  # no first block: nothing counts
    counts = index.cached_blocks([1, 2, 3, 4], ["full", "holed", "tail", "absent"])
    assert counts == {"full": 4, "holed": 2, "tail": 0, "absent": 0}


def test_cached_blocks_of_an_empty_index_or_empty_prompt_are_zero():
    index = KVIndex()
    assert index.cached_blocks([1, 2], ["w0", "w1"]) == {"w0": 0, "w1": 0}
    index.apply(CacheBatch("w0", stored=(1,)))
    assert index.cached_blocks([], ["w0"]) == {"w0": 0}


def test_num_blocks_drops_only_when_the_last_holder_evicts():
    index = KVIndex()
    index.apply(CacheBatch("w0", stored=(1, 2)))
    index.apply(CacheBatch("w1", stored=(1,)))
    assert index.num_blocks == 2
    index.apply(CacheBatch("w0", evicted=(1,)))
    assert index.num_blocks == 2  # w1 still holds 1
    index.apply(CacheBatch("w1", evicted=(1,)))
    assert index.num_blocks == 1
    index.apply(CacheBatch("w0", evicted=(2, 99)))  # 99 never stored: ignored
    assert index.num_blocks == 0


# ---- policy -----------------------------------------------------------------------------------------------------


def worker(worker_id: str, role: Role = Role.DECODE, **load) -> WorkerInfo:
    return WorkerInfo(worker_id, role, f"actor-{worker_id}", 1, WorkerState.READY, **load)


def affinity(cached: dict[str, int], weight: float = 1.0, prompt_tokens: int = 100, block_size: int = 16,
             shareable: int | None = None) -> Affinity:
    shareable = (prompt_tokens - 1) // block_size if shareable is None else shareable
    return Affinity(prompt_tokens, shareable, block_size, cached, weight)


DECODE = [worker("a", kv_blocks_used=60, kv_blocks_total=100), worker("b", kv_blocks_used=20, kv_blocks_total=100),
          worker("c", kv_blocks_used=20, kv_blocks_total=100, running=3)]
PREFILL = [worker("a", Role.PREFILL, queued_prefill_tokens=500), worker("b", Role.PREFILL, queued_prefill_tokens=0),
           worker("c", Role.PREFILL, queued_prefill_tokens=0, running=2)]


def test_without_affinity_the_choice_is_load_only():
    assert pick_decode(DECODE).worker_id == "b"  # most free, then fewest running
    assert pick_prefill(PREFILL, {}).worker_id == "b"
    assert pick_prefill(PREFILL, {"b": 10}).worker_id == "c"  # in-flight tokens first
    assert pick_decode([]) is None and pick_prefill([], {}) is None


def test_affinity_where_no_candidate_holds_anything_is_the_load_only_choice():
    for nothing in (affinity({}), affinity({"a": 0, "b": 0}), affinity({"elsewhere": 5})):
        assert pick_decode(DECODE, nothing) == pick_decode(DECODE)
        assert pick_prefill(PREFILL, {}, nothing) == pick_prefill(PREFILL, {})
        assert pick_prefill(PREFILL, {"b": 10}, nothing) == pick_prefill(PREFILL, {"b": 10})


def test_pick_prefill_follows_the_cache_until_its_queue_exceeds_weight_times_saved_tokens():
    # "a" holds 4 blocks of 16 = 64 saved tokens of a 100-token prompt; "b" holds nothing and has no queue.
    # cost(a) = queue + w * 36, cost(b) = 100 w: "a" wins while its queue < w * 64.
    for weight, threshold in ((1.0, 64), (0.5, 32), (2.0, 128)):
        cached = affinity({"a": 4}, weight)
        pair = [worker("a", Role.PREFILL, queued_prefill_tokens=threshold - 1), worker("b", Role.PREFILL)]
        assert pick_prefill(pair, {}, cached).worker_id == "a", weight
        pair[0] = worker("a", Role.PREFILL, queued_prefill_tokens=threshold + 1)
        assert pick_prefill(pair, {}, cached).worker_id == "b", weight
        # the router's in-flight tokens count as queue too
        pair[0] = worker("a", Role.PREFILL, queued_prefill_tokens=threshold - 1)
        assert pick_prefill(pair, {"a": 2}, cached).worker_id == "b", weight


def test_pick_prefill_prefers_the_longer_cached_prefix_at_equal_load():
    three = [worker(w, Role.PREFILL) for w in ("a", "b", "c")]
    assert pick_prefill(three, {}, affinity({"a": 1, "b": 5, "c": 3})).worker_id == "b"


def test_pick_decode_follows_the_cache_until_its_used_share_outweighs_the_uncached_share():
    # "a" holds 3 of the prompt's 4 shareable blocks (uncached share 0.25), "b" nothing (1.0), "b" is empty:
    # "a" wins while its used share < w * 0.75.
    for weight, used_below, used_above in ((1.0, 74, 76), (0.4, 29, 31)):
        cached = affinity({"a": 3}, weight, prompt_tokens=70, block_size=16)
        assert cached.shareable_blocks == 4
        pair = [worker("a", kv_blocks_used=used_below, kv_blocks_total=100), worker("b", kv_blocks_total=100)]
        assert pick_decode(pair, cached).worker_id == "a", weight
        pair[0] = worker("a", kv_blocks_used=used_above, kv_blocks_total=100)
        assert pick_decode(pair, cached).worker_id == "b", weight


def test_weight_zero_pick_decode_is_load_only_for_equal_sized_workers():
    zero = affinity({"a": 6}, weight=0.0)
    assert pick_decode(DECODE, zero) == pick_decode(DECODE)
    pair = [worker("a", kv_blocks_used=50, kv_blocks_total=100), worker("b", kv_blocks_used=49, kv_blocks_total=100)]
    assert pick_decode(pair, zero).worker_id == "b"


def test_weight_zero_pick_prefill_ignores_the_cache():
    zero = affinity({"a": 6}, weight=0.0)
    pair = [worker("a", Role.PREFILL, queued_prefill_tokens=10), worker("b", Role.PREFILL, queued_prefill_tokens=9)]
    assert pick_prefill(pair, {}, zero).worker_id == "b"
    assert pick_prefill(PREFILL, {}, zero) == pick_prefill(PREFILL, {})


def test_weight_zero_pick_prefill_equals_load_only_when_in_flight_and_queued_disagree():
    zero = affinity({"a": 6}, weight=0.0)
    pair = [worker("a", Role.PREFILL, queued_prefill_tokens=500), worker("b", Role.PREFILL)]
    in_flight = {"b": 100}
    assert pick_prefill(pair, in_flight).worker_id == "a"  # load-only: fewest in-flight tokens first
    assert pick_prefill(pair, in_flight, zero) == pick_prefill(pair, in_flight)


def test_weight_zero_pick_decode_equals_load_only_for_workers_of_different_sizes():
    zero = affinity({"a": 6}, weight=0.0)
    pair = [worker("a", kv_blocks_used=50, kv_blocks_total=100), worker("b", kv_blocks_used=600, kv_blocks_total=1000)]
    assert pick_decode(pair).worker_id == "b"  # load-only: most free blocks (400 > 50)
    assert pick_decode(pair, zero) == pick_decode(pair)


# ---- CacheEventPublisher ----------------------------------------------------------------------------------------


class FakeLog:
    """A KVEventLog stand-in: publish appends, or raises redis.ConnectionError while `failing`."""

    def __init__(self) -> None:
        self.batches: list[CacheBatch] = []
        self.failing = False
        self.attempts = 0

    def publish(self, batch: CacheBatch) -> None:
        self.attempts += 1
        if self.failing:
            raise redis.ConnectionError("redis away")
        self.batches.append(batch)


def cache(blocks: BlockManager, hashes: list[int]) -> list[int]:
    """Allocate a block per hash and register it (a request's computed full blocks); the ids, still held."""
    ids = blocks.allocate(len(hashes))
    for block_id, block_hash in zip(ids, hashes):
        blocks.register(block_id, block_hash)
    return ids


def index_of(batches: list[CacheBatch]) -> KVIndex:
    index = KVIndex()
    for batch in batches:
        index.apply(batch)
    return index


def held(index: KVIndex, worker_id: str, hashes) -> set[int]:
    return {h for h in hashes if index.cached_blocks([h], [worker_id])[worker_id]}


def started(blocks: BlockManager, fake: FakeLog) -> CacheEventPublisher:
    """A publisher that sent its first (reset) batch."""
    publisher = CacheEventPublisher("w0", fake)
    publisher.add(blocks)
    publisher.flush()
    assert fake.batches[-1].reset
    return publisher


def test_flush_before_the_first_add_publishes_nothing():
    fake = FakeLog()
    publisher = CacheEventPublisher("w0", fake)
    publisher.flush()
    publisher.flush()
    assert fake.attempts == 0


def test_first_batch_is_a_reset_carrying_the_snapshot():
    blocks = BlockManager(num_blocks=8, block_size=4)
    cache(blocks, [11, 12])  # the engine held these before the publisher existed (a role switch)
    fake = FakeLog()
    publisher = CacheEventPublisher("w0", fake)
    publisher.add(blocks)
    assert blocks.record_events
    cache(blocks, [13])  # after the snapshot, before the first flush
    publisher.add(blocks)
    publisher.flush()
    assert fake.batches == [CacheBatch("w0", stored=(11, 12, 13), evicted=(), reset=True)]


def test_first_batch_of_an_empty_cache_is_an_empty_reset():
    fake = FakeLog()
    started(BlockManager(num_blocks=4, block_size=4), fake)
    assert fake.batches == [CacheBatch("w0", reset=True)]


def test_later_batches_carry_stored_and_evicted_in_order_without_reset():
    blocks = BlockManager(num_blocks=3, block_size=4)
    fake = FakeLog()
    publisher = started(blocks, fake)
    first = cache(blocks, [1, 2, 3])
    publisher.add(blocks)
    publisher.flush()
    publisher.flush()  # nothing new: nothing sent
    blocks.free(reversed(first))  # evictable order: 3, 2, 1
    cache(blocks, [4, 5])  # evicts 3 then 2
    publisher.add(blocks)
    publisher.flush()
    assert fake.batches[1:] == [CacheBatch("w0", stored=(1, 2, 3)), CacheBatch("w0", stored=(4, 5), evicted=(3, 2))]
    assert held(index_of(fake.batches), "w0", range(10)) == set(blocks.cached_hashes()) == {1, 4, 5}


def test_failed_reset_is_put_back_and_sent_as_a_reset_by_the_next_flush():
    blocks = BlockManager(num_blocks=8, block_size=4)
    cache(blocks, [1, 2])
    fake = FakeLog()
    publisher = CacheEventPublisher("w0", fake)
    publisher.add(blocks)
    fake.failing = True
    publisher.flush()  # does not raise
    assert fake.batches == []
    cache(blocks, [3])
    publisher.add(blocks)
    fake.failing = False
    publisher.flush()
    assert fake.batches == [CacheBatch("w0", stored=(1, 2, 3), reset=True)]
    publisher.flush()
    assert len(fake.batches) == 1


def test_failed_batch_is_put_back_ahead_of_newer_events():
    blocks = BlockManager(num_blocks=2, block_size=4)
    fake = FakeLog()
    publisher = started(blocks, fake)
    ids = cache(blocks, [1, 2])
    publisher.add(blocks)
    fake.failing = True
    publisher.flush()
    publisher.flush()  # still away: still kept
    blocks.free(reversed(ids))
    cache(blocks, [3])  # evicts 2
    publisher.add(blocks)
    fake.failing = False
    publisher.flush()
    assert fake.batches[1:] == [CacheBatch("w0", stored=(1, 3), evicted=(2,), reset=False)]  # latest changes
    assert held(index_of(fake.batches), "w0", range(5)) == set(blocks.cached_hashes()) == {1, 3}


def test_overflow_while_away_makes_the_next_batch_a_reset_with_a_fresh_snapshot(monkeypatch):
    monkeypatch.setattr("pdserve.worker.cache_events.MAX_PENDING", 3)
    blocks = BlockManager(num_blocks=8, block_size=4)
    fake = FakeLog()
    publisher = started(blocks, fake)
    cache(blocks, [1, 2])
    publisher.add(blocks)
    fake.failing = True
    publisher.flush()  # 2 pending
    cache(blocks, [3, 4])
    publisher.add(blocks)  # 4 pending > 3: dropped
    fake.failing = False
    publisher.flush()  # no snapshot taken yet: nothing to send
    assert len(fake.batches) == 1
    cache(blocks, [5])
    publisher.add(blocks)  # takes the snapshot (which includes 5)
    publisher.flush()
    assert fake.batches[1:] == [CacheBatch("w0", stored=(1, 2, 3, 4, 5), reset=True)]
    cache(blocks, [6])
    publisher.add(blocks)
    publisher.flush()
    assert fake.batches[2:] == [CacheBatch("w0", stored=(6,))]
    assert held(index_of(fake.batches), "w0", range(10)) == set(blocks.cached_hashes())


def test_exactly_max_pending_events_are_kept_through_failures(monkeypatch):
    monkeypatch.setattr("pdserve.worker.cache_events.MAX_PENDING", 3)
    blocks = BlockManager(num_blocks=8, block_size=4)
    fake = FakeLog()
    publisher = started(blocks, fake)
    cache(blocks, [1, 2])
    publisher.add(blocks)
    fake.failing = True
    publisher.flush()
    cache(blocks, [3])
    publisher.add(blocks)  # 3 pending: at the bound, kept
    publisher.flush()  # put back: still 3, still kept
    fake.failing = False
    publisher.flush()
    assert fake.batches[1:] == [CacheBatch("w0", stored=(1, 2, 3), reset=False)]


def test_index_keeps_a_block_evicted_and_cached_again_within_one_beat():
    blocks = BlockManager(num_blocks=2, block_size=4)
    fake = FakeLog()
    publisher = started(blocks, fake)
    ids = cache(blocks, [1, 2])
    publisher.add(blocks)
    publisher.flush()
    blocks.free(ids)  # evictable order: 1, 2
    cache(blocks, [1])  # a request recomputes prefix 1: its old block is evicted first, then 1 is cached again
    publisher.add(blocks)
    publisher.flush()
    assert fake.batches[-1] == CacheBatch("w0", stored=(1,))  # its latest change only
    assert set(blocks.cached_hashes()) == {1, 2}
    assert held(index_of(fake.batches), "w0", range(5)) == {1, 2}


def test_overflow_during_a_failing_publish_still_heals_the_index(monkeypatch):
    monkeypatch.setattr("pdserve.worker.cache_events.MAX_PENDING", 3)
    blocks = BlockManager(num_blocks=8, block_size=4)
    fake = FakeLog()
    publisher = CacheEventPublisher("w0", fake)
    cache(blocks, [1])
    publisher.add(blocks)  # snapshot: (1,)

    class EngineStepsDuringPublish(FakeLog):
        def publish(self, batch):
            cache(blocks, [2, 3, 4, 5])  # the engine thread runs meanwhile and overflows the pending events
            publisher.add(blocks)
            raise redis.ConnectionError("redis away")

    publisher._log = EngineStepsDuringPublish()
    publisher.flush()
    publisher._log = fake
    cache(blocks, [6])
    publisher.add(blocks)
    publisher.flush()
    assert fake.batches and fake.batches[0].reset
    assert held(index_of(fake.batches), "w0", range(10)) == set(blocks.cached_hashes()) == {1, 2, 3, 4, 5, 6}


def test_expected_blocks_count_as_held_until_they_expire():
    index = KVIndex()
    index.apply(CacheBatch("a", stored=(1,)))
    index.expect("b", (1, 2), now=100.0)  # a router just sent b a prompt with these blocks
    assert index.cached_blocks((1, 2, 3), ["a", "b"], now=101.0) == {"a": 1, "b": 2}
    assert index.cached_blocks((1, 2, 3), ["a", "b"], now=100.0 + EXPECT_S + 1) == {"a": 1, "b": 0}


def test_a_worker_that_left_and_went_quiet_is_pruned_a_fresh_one_is_kept():
    index = KVIndex()
    index.apply(CacheBatch("gone", stored=(1, 2)), now=0.0)
    index.apply(CacheBatch("starting", stored=(3,)), now=95.0)  # publishes before routers list it
    index.apply(CacheBatch("listed", stored=(4,)), now=0.0)  # idle for long, but still a member
    assert index.prune(["listed"], quiet_s=60, now=100.0) == ["gone"]
    assert index.cached_blocks((1,), ["gone"]) == {"gone": 0} and index.num_blocks == 2
    assert index.prune(["listed"], quiet_s=60, now=200.0) == ["starting"]
