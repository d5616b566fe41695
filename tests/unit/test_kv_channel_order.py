"""The KV connector over a transport that matches messages by order and ignores tags, as NCCL does
(`kv_transfer.loopback`): concurrent transfers on one pair, posted in another order on each side, each land in the
blocks of the receive they were meant for (two of them of one size, the case that would swap two requests' KV);
every outcome (done, failed, cancelled, timed out) is reported once on each side, and the pair stays in step."""

import random
import time

import pytest
import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer.connector import Transfer, TransferStatus
from pdserve.kv_transfer.loopback import LoopbackGroup
from pdserve.kv_transfer.send_delay import InjectedPause
from pdserve.kv_transfer.torch_dist import TorchDistConnector
from pdserve.kv_transfer.wire import MAX_DIRECT_PIECES, Piece, runs, sender_pieces

TINY = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position=256,
                   tie_word_embeddings=True)
BLOCKS = 64


def cache(seed: int) -> KVCache:
    kv = KVCache(TINY, num_blocks=BLOCKS, block_size=4, dtype=torch.float32, device="cpu")
    kv.tensor.copy_(torch.randn(kv.tensor.shape, generator=torch.Generator().manual_seed(seed)))
    return kv


def pair(checksums: bool = True, send_delay=None) -> tuple[TorchDistConnector, TorchDistConnector]:
    prefill = TorchDistConnector("prefill-0", checksums=checksums, send_delay=send_delay)
    decode = TorchDistConnector("decode-0", checksums=checksums)
    prefill.register(cache(1))
    decode.register(cache(2))
    first, second = LoopbackGroup.pair()
    prefill.add_pair("decode-0", first, 1)
    decode.add_pair("prefill-0", second, 0)
    return prefill, decode


def outcomes(*sides: TorchDistConnector, count: int, limit_s: float = 20.0) -> dict:
    found, deadline = {}, time.monotonic() + limit_s
    while len(found) < count and time.monotonic() < deadline:
        for side in sides:
            for result in side.poll():
                assert (side.worker_id, result.transfer_id) not in found, "reported twice"
                found[(side.worker_id, result.transfer_id)] = result
        time.sleep(0.002)
    return found


def blocks(kv: KVCache, ids) -> torch.Tensor:
    return kv.read_blocks(tuple(ids))


def test_runs_and_pieces():
    assert runs((4, 5, 6, 9, 10, 2)) == [Piece(0, 3), Piece(3, 2), Piece(5, 1)]
    assert runs(()) == []
    scattered = tuple(range(0, 4 * (MAX_DIRECT_PIECES + 1), 4))
    assert sender_pieces(scattered)[1] is True and len(sender_pieces(scattered)[0]) == 1
    assert sender_pieces((3, 4, 5, 7))[1] is False and len(sender_pieces((3, 4, 5, 7))[0]) == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_concurrent_transfers_posted_in_other_orders_land_where_they_were_meant(seed):
    rng = random.Random(seed)
    prefill, decode = pair()
    free_source, free_target = list(range(BLOCKS)), list(range(BLOCKS))
    rng.shuffle(free_source)
    transfers = []
    for tag, size in enumerate([3, 3, 5, 1, 3, 8, 2, 3], start=1):  # four of 3 blocks: swapping them is silent
        source = tuple(free_source.pop() for _ in range(size))  # scattered on the sender (gathered or pieces)
        if tag % 2:
            target = tuple(free_target.pop(0) for _ in range(size))  # consecutive on the receiver: written in place
        else:
            target = tuple(free_target.pop() for _ in range(size))  # descending: through staging
        transfers.append((f"r{tag}", tag, source, target))
    sends = transfers[:]
    rng.shuffle(sends)
    receives = transfers[:]
    rng.shuffle(receives)
    for i in range(len(transfers)):  # interleaved, so some KV arrives before its receive is posted
        request_id, tag, source, _ = sends[i]
        prefill.start_send(Transfer(request_id, "decode-0", source, tag, timeout_s=10))
        request_id, tag, _, target = receives[i]
        decode.start_recv(Transfer(request_id, "prefill-0", target, tag, timeout_s=10))
    found = outcomes(prefill, decode, count=2 * len(transfers))
    assert {r.status for r in found.values()} == {TransferStatus.DONE}, found
    for request_id, _, source, target in transfers:
        assert torch.equal(blocks(decode.kv_cache, target), blocks(prefill.kv_cache, source)), request_id
    assert prefill.pending == {} and decode.pending == {}


def test_every_outcome_is_reported_once_on_each_side_and_the_pair_stays_in_step():
    prefill, decode = pair()
    decode.start_recv(Transfer("wrong-size", "prefill-0", (10, 11, 12), tag=1, timeout_s=10))
    prefill.start_send(Transfer("wrong-size", "decode-0", (1, 2), tag=1, timeout_s=10))
    prefill.start_send(Transfer("unwanted", "decode-0", (3, 4), tag=2, timeout_s=10))
    decode.start_recv(Transfer("unwanted", "prefill-0", (13, 14), tag=2, timeout_s=10))
    decode.cancel("unwanted")  # a posted receive given up: its KV is drained when it comes
    decode.start_recv(Transfer("late", "prefill-0", (15,), tag=3, timeout_s=0.3))
    found = outcomes(prefill, decode, count=5)
    time.sleep(0.5)
    prefill.start_send(Transfer("late", "decode-0", (5,), tag=3, timeout_s=10))  # after its receive timed out
    prefill.start_send(Transfer("next", "decode-0", (6, 7), tag=4, timeout_s=10))
    decode.start_recv(Transfer("next", "prefill-0", (20, 21), tag=4, timeout_s=10))
    found.update(outcomes(prefill, decode, count=3))
    assert {key: r.status for key, r in found.items()} == {
        ("decode-0", "wrong-size"): TransferStatus.FAILED, ("prefill-0", "wrong-size"): TransferStatus.DONE,
        ("decode-0", "unwanted"): TransferStatus.CANCELLED, ("prefill-0", "unwanted"): TransferStatus.DONE,
        ("decode-0", "late"): TransferStatus.TIMED_OUT, ("prefill-0", "late"): TransferStatus.DONE,
        ("decode-0", "next"): TransferStatus.DONE, ("prefill-0", "next"): TransferStatus.DONE}
    assert found[("decode-0", "wrong-size")].error == "sent 2 blocks, expected 3"
    assert torch.equal(blocks(decode.kv_cache, (20, 21)), blocks(prefill.kv_cache, (6, 7)))
    assert torch.equal(blocks(decode.kv_cache, (10, 11, 12, 13, 14, 15)), blocks(cache(2), (10, 11, 12, 13, 14, 15)))
    assert prefill.pending == {} and decode.pending == {} and "prefill-0" in decode.pairs


def test_a_receive_cancelled_while_its_kv_lands_is_reported_only_once_the_kv_stops():
    """Its blocks are written in place, so they may be freed only when nothing writes them any more."""
    prefill, decode = pair(send_delay=InjectedPause(0.5))  # each send pauses after its header and piece lengths
    decode.start_recv(Transfer("r1", "prefill-0", (30, 31), tag=1, timeout_s=10))
    prefill.start_send(Transfer("r1", "decode-0", (1, 2), tag=1, timeout_s=10))
    time.sleep(0.2)  # the header was read: r1 is on the wire
    decode.cancel("r1")
    assert decode.poll() == []  # not yet: the rest of its KV is coming into its blocks
    found = outcomes(prefill, decode, count=2)
    assert found[("decode-0", "r1")].status is TransferStatus.CANCELLED
    assert found[("decode-0", "r1")].seconds >= 0.45
    assert found[("prefill-0", "r1")].status is TransferStatus.DONE


def test_a_cancelled_receive_still_waiting_is_reported_at_once():
    prefill, decode = pair()
    decode.start_recv(Transfer("r1", "prefill-0", (30, 31), tag=1, timeout_s=10))
    decode.cancel("r1")
    assert [(r.transfer_id, r.status) for r in decode.poll()] == [("r1", TransferStatus.CANCELLED)]
    prefill.start_send(Transfer("r1", "decode-0", (1, 2), tag=1, timeout_s=10))  # drained; the pair goes on
    prefill.start_send(Transfer("r2", "decode-0", (3,), tag=2, timeout_s=10))
    decode.start_recv(Transfer("r2", "prefill-0", (40,), tag=2, timeout_s=10))
    found = outcomes(prefill, decode, count=3)
    assert {r.status for r in found.values()} == {TransferStatus.DONE}
    assert torch.equal(blocks(decode.kv_cache, (40,)), blocks(prefill.kv_cache, (3,)))
    assert torch.equal(blocks(decode.kv_cache, (30, 31)), blocks(cache(2), (30, 31)))


def test_a_broken_pair_fails_what_waits_on_it_and_is_dropped():
    prefill, decode = pair()
    decode.start_recv(Transfer("r1", "prefill-0", (30,), tag=1, timeout_s=10))
    decode.start_recv(Transfer("r2", "prefill-0", (31,), tag=2, timeout_s=10))
    decode.pairs["prefill-0"].group.abort()  # the read queued for r1 fails: the pair breaks
    found = outcomes(decode, count=2)
    assert {r.status for r in found.values()} == {TransferStatus.FAILED}
    assert "prefill-0" not in decode.pairs and decode.pending == {}


def test_discarded_kv_writes_no_block_whether_it_came_before_or_after_and_the_pair_stays_in_step():
    """A request aborted on the decode worker while its KV was on the way: its KV is thrown away, not written into
    some block (KV that came before the discard was once applied to block 0, which another request's prefix held)."""
    prefill, decode = pair()
    before = cache(2).tensor.clone()
    prefill.start_send(Transfer("early", "decode-0", (1, 2, 3), tag=1, timeout_s=10))
    prefill.start_send(Transfer("other", "decode-0", (8,), tag=9, timeout_s=10))
    decode.start_recv(Transfer("other", "prefill-0", (40,), tag=9, timeout_s=10))  # its read takes "early" first
    deadline = time.monotonic() + 10
    while ("prefill-0", 1) not in decode._arrived and time.monotonic() < deadline:
        time.sleep(0.005)
    decode.discard("prefill-0", 1)  # its KV is here, in staging; the read it queues takes "other"
    decode.discard("prefill-0", 2)  # announced, its KV still to come
    prefill.start_send(Transfer("late", "decode-0", (4, 5), tag=2, timeout_s=10))
    prefill.start_send(Transfer("next", "decode-0", (6, 7), tag=3, timeout_s=10))
    decode.start_recv(Transfer("next", "prefill-0", (20, 21), tag=3, timeout_s=10))
    found = outcomes(prefill, decode, count=6)
    assert {r.status for r in found.values()} == {TransferStatus.DONE} and len(found) == 6
    assert torch.equal(blocks(decode.kv_cache, (20, 21)), blocks(prefill.kv_cache, (6, 7)))
    assert torch.equal(blocks(decode.kv_cache, (40,)), blocks(prefill.kv_cache, (8,)))
    untouched = [b for b in range(BLOCKS) if b not in (20, 21, 40)]
    assert torch.equal(decode.kv_cache.tensor[:, :, untouched], before[:, :, untouched])
    assert decode._arrived == {} and decode._dropped == {} and decode.pending == {} and "prefill-0" in decode.pairs
