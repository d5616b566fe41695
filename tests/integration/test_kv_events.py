"""KV cache events through a real redis-server: KVEventLog round trips, a restarted router rebuilding the same
KVIndex from the stream, and worker publisher and router follower riding out Redis being away."""

import asyncio
import shutil
import uuid

import pytest
import redis

from pdserve.control_plane.local_redis import LocalRedis, free_port
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.prefix_hash import block_hashes
from pdserve.registry.kv_events import FIRST_ID, CacheBatch, KVEventLog
from pdserve.router.kv_index import KVIndex, KVIndexFollower
from pdserve.worker.cache_events import CacheEventPublisher

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def server() -> LocalRedis:
    running = LocalRedis.start()
    yield running
    running.stop()


def event_log(url: str) -> KVEventLog:
    """A log under a prefix of its own, on a client made as `Registry` makes it."""
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    return KVEventLog(client, f"pdserve:test-{uuid.uuid4().hex[:8]}")


def port_of(server: LocalRedis) -> int:
    return int(server.url.rsplit(":", 1)[1].split("/")[0])


def read_all(log: KVEventLog) -> list[CacheBatch]:
    return log.read()[1]


def follow(follower: KVIndexFollower) -> int:
    return asyncio.run(follower.read_once())


def catch_up(follower: KVIndexFollower) -> None:
    while follow(follower):
        pass


def serve(blocks: BlockManager, tokens: list[int]) -> None:
    """A request on a worker: reuse its cached prefix, compute and register the rest, then end (free)."""
    hashes = block_hashes(tokens, BLOCK_SIZE)
    ids = blocks.cached_prefix(hashes)
    blocks.share(ids)
    new = blocks.allocate(len(hashes) - len(ids))
    for block_id, block_hash in zip(new, hashes[len(ids):]):
        blocks.register(block_id, block_hash)
    blocks.free(reversed(ids + new))


# ---- KVEventLog -------------------------------------------------------------------------------------------------


def test_batches_round_trip_in_order_with_the_id_to_continue_from(server):
    log = event_log(server.url)
    sent = [CacheBatch("w0", stored=(0, 1, 2**64 - 1), reset=True),
            CacheBatch("w1"),
            CacheBatch("w0", stored=(), evicted=(2**64 - 1, 2**63, 7)),
            CacheBatch("worker-ü", stored=tuple(range(1000)), evicted=(5,), reset=False)]
    for batch in sent:
        log.publish(batch)
    last_id, got = log.read()
    assert got == sent
    newest = log.redis.xrevrange(log.key, count=1)[0][0].decode()
    assert last_id == newest
    assert log.read(after=last_id) == (last_id, [])


def test_read_after_the_last_id_returns_only_newer_batches(server):
    log = event_log(server.url)
    log.publish(CacheBatch("w0", stored=(1,), reset=True))
    log.publish(CacheBatch("w0", stored=(2,)))
    last_id, _ = log.read()
    log.publish(CacheBatch("w1", stored=(3,), reset=True))
    log.publish(CacheBatch("w0", evicted=(1,)))
    next_id, newer = log.read(after=last_id)
    assert newer == [CacheBatch("w1", stored=(3,), reset=True), CacheBatch("w0", evicted=(1,))]
    assert next_id == log.redis.xrevrange(log.key, count=1)[0][0].decode()
    assert log.read(after=next_id, block_ms=10) == (next_id, [])


def test_read_honours_count_and_continues_from_there(server):
    log = event_log(server.url)
    sent = [CacheBatch("w0", stored=(i,)) for i in range(5)]
    for batch in sent:
        log.publish(batch)
    after, first = log.read(count=2)
    _, rest = log.read(after=after)
    assert (first, rest) == (sent[:2], sent[2:])


def test_read_of_an_empty_stream_returns_nothing_and_keeps_the_id(server):
    assert event_log(server.url).read() == (FIRST_ID, [])


# ---- a router restart ---------------------------------------------------------------------------------------------


def test_restarted_router_rebuilds_the_same_index_from_the_stream(server):
    log = event_log(server.url)
    workers = {w: BlockManager(num_blocks=6, block_size=BLOCK_SIZE) for w in ("w0", "w1")}
    publishers = {w: CacheEventPublisher(w, log) for w in workers}
    live = KVIndexFollower(KVIndex(), log)

    def beat(worker_id: str) -> None:
        publishers[worker_id].add(workers[worker_id])
        publishers[worker_id].flush()
        assert follow(live) == 1

    p = list(range(100, 116))  # 4 blocks
    q = p[:8] + list(range(200, 208))  # shares p's first 2 blocks
    r = list(range(300, 312))  # 3 blocks
    for worker_id in workers:
        beat(worker_id)  # the start: an empty reset
    serve(workers["w0"], p)
    beat("w0")
    serve(workers["w1"], q)
    beat("w1")
    serve(workers["w0"], q)  # reuses p's first 2 blocks, fills the cache
    beat("w0")
    serve(workers["w0"], r)  # evicts p's last 2 blocks and q's last one
    beat("w0")
    serve(workers["w1"], r)  # evicts q's last block on w1
    serve(workers["w1"], p[:8] + [1, 2, 3, 4])  # another beat's worth before the flush
    beat("w1")
    assert workers["w0"].evictions == 3 and workers["w1"].evictions >= 1

    rebuilt = KVIndexFollower(KVIndex(), log)
    catch_up(rebuilt)
    assert rebuilt.last_id == live.last_id
    assert rebuilt.index.batches_applied == live.index.batches_applied == 7
    names = ["w0", "w1", "w-unknown"]
    for prompt in (p, q, r, p[:8], p[:8] + [1, 2, 3, 4], list(range(900, 912))):
        hashes = block_hashes(prompt, BLOCK_SIZE)
        truth = {w: len(workers[w].cached_prefix(hashes)) if w in workers else 0 for w in names}
        assert live.index.cached_blocks(hashes, names) == truth
        assert rebuilt.index.cached_blocks(hashes, names) == truth
    assert live.index.num_blocks == rebuilt.index.num_blocks
    hashes = block_hashes(p, BLOCK_SIZE)
    assert rebuilt.index.cached_blocks(hashes, names) == {"w0": 2, "w1": 2, "w-unknown": 0}


# ---- Redis away ---------------------------------------------------------------------------------------------------


def test_publisher_keeps_events_while_redis_is_away_and_sends_them_when_it_is_back():
    first = LocalRedis.start()
    again = None
    try:
        log = event_log(first.url)
        blocks = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
        publisher = CacheEventPublisher("w0", log)
        publisher.add(blocks)
        publisher.flush()
        assert read_all(log) == [CacheBatch("w0", reset=True)]
        first.stop()
        serve(blocks, list(range(16)))
        publisher.add(blocks)
        publisher.flush()  # does not raise
        serve(blocks, list(range(50, 58)))  # evicts two blocks of the first request
        publisher.add(blocks)
        publisher.flush()
        again = LocalRedis.start(port_of(first))  # empty: nothing persisted
        publisher.flush()
        hashes = block_hashes(list(range(16)), BLOCK_SIZE)
        assert read_all(log) == [CacheBatch("w0", stored=(*hashes[:2], *block_hashes(list(range(50, 58)), BLOCK_SIZE)),
                                            evicted=(hashes[2], hashes[3]))]  # each hash by its latest change
    finally:
        first.stop()
        if again is not None:
            again.stop()


def test_publisher_to_a_port_with_nothing_listening_sends_its_reset_once_a_server_starts_there():
    port = free_port()
    log = event_log(f"redis://127.0.0.1:{port}/0")
    blocks = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    serve(blocks, list(range(12)))  # cached before the publisher starts
    publisher = CacheEventPublisher("w0", log)
    publisher.add(blocks)
    publisher.flush()  # does not raise
    serve(blocks, list(range(20, 24)))
    publisher.add(blocks)
    publisher.flush()
    late = LocalRedis.start(port)
    try:
        publisher.flush()
        expected = (*block_hashes(list(range(12)), BLOCK_SIZE), *block_hashes(list(range(20, 24)), BLOCK_SIZE))
        assert read_all(log) == [CacheBatch("w0", stored=expected, reset=True)]
        publisher.flush()
        assert len(read_all(log)) == 1
    finally:
        late.stop()


def test_follower_keeps_its_index_while_redis_is_away(monkeypatch):
    monkeypatch.setattr("pdserve.router.kv_index.RETRY_S", 0.01)
    first = LocalRedis.start()
    again = None
    try:
        log = event_log(first.url)
        log.publish(CacheBatch("w0", stored=(1, 2, 3), reset=True))
        follower = KVIndexFollower(KVIndex(), log)
        assert follow(follower) == 1
        seen = follower.last_id
        first.stop()
        assert follow(follower) == 0  # does not raise
        assert follow(follower) == 0
        assert follower.last_id == seen
        assert follower.index.cached_blocks([1, 2, 3], ["w0"]) == {"w0": 3}
        again = LocalRedis.start(port_of(first))
        log.publish(CacheBatch("w0", evicted=(3,)))
        assert follow(follower) == 1
        assert follower.index.cached_blocks([1, 2, 3], ["w0"]) == {"w0": 2}
    finally:
        first.stop()
        if again is not None:
            again.stop()


def test_follower_of_a_port_with_nothing_listening_does_not_raise(monkeypatch):
    monkeypatch.setattr("pdserve.router.kv_index.RETRY_S", 0.01)
    follower = KVIndexFollower(KVIndex(), event_log(f"redis://127.0.0.1:{free_port()}/0"))
    assert follow(follower) == 0
    assert (follower.last_id, follower.index.num_blocks, follower.index.batches_applied) == (FIRST_ID, 0, 0)
