"""The in-process KV connector, and the invariant that every outcome lets both sides free their blocks."""

import time

import pytest
import torch

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer.connector import Transfer, TransferError, TransferStatus
from pdserve.kv_transfer.in_process import Exchange, InProcessConnector

TINY = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position=128,
                   tie_word_embeddings=True)


class Side:
    """One worker: a KV cache, its block manager and its connector."""

    def __init__(self, name: str, exchange: Exchange, seed: int) -> None:
        self.cache = KVCache(TINY, num_blocks=8, block_size=4, dtype=torch.float32, device="cpu")
        self.cache.tensor.copy_(torch.randn(self.cache.tensor.shape, generator=torch.Generator().manual_seed(seed)))
        self.blocks = BlockManager(8, 4)
        self.connector = InProcessConnector(name, exchange)
        self.connector.register(self.cache)


def pair() -> tuple[Exchange, Side, Side]:
    exchange = Exchange()
    return exchange, Side("prefill", exchange, 1), Side("decode", exchange, 2)


def handoff(exchange, prefill, decode, outcome: str) -> dict[str, TransferStatus]:
    """Run one handoff to the given outcome; each side frees its blocks when its transfer is reported."""
    src, dst = prefill.blocks.allocate(3), decode.blocks.allocate(3)
    timeout = 0.05 if outcome == "timeout" else 5.0
    if outcome == "fail":
        exchange.fail_next("decode")
    decode.connector.start_recv(Transfer("x", "prefill", tuple(dst), tag=9, timeout_s=timeout))
    if outcome == "cancel":
        decode.connector.cancel("x")
    if outcome != "timeout":
        prefill.connector.start_send(Transfer("x", "decode", tuple(src), tag=9))
    else:
        time.sleep(0.1)
    seen = {}
    for side, ids in ((prefill, src), (decode, dst)):
        for result in side.connector.poll():
            seen[side.connector.worker_id] = result.status
            side.blocks.free(ids)
    return seen


def test_done_copies_the_blocks():
    exchange, prefill, decode = pair()
    expected = prefill.cache.read_blocks((0, 1, 2))
    assert handoff(exchange, prefill, decode, "done") == {"prefill": TransferStatus.DONE,
                                                           "decode": TransferStatus.DONE}
    assert torch.equal(decode.cache.read_blocks((0, 1, 2)), expected)


@pytest.mark.parametrize(("outcome", "decode_status"), [("done", TransferStatus.DONE),
                                                        ("fail", TransferStatus.FAILED),
                                                        ("cancel", TransferStatus.CANCELLED),
                                                        ("timeout", TransferStatus.TIMED_OUT)])
def test_every_outcome_is_reported_once_and_frees_blocks_on_the_decode_side(outcome, decode_status):
    exchange, prefill, decode = pair()
    seen = handoff(exchange, prefill, decode, outcome)
    assert seen["decode"] is decode_status
    assert decode.blocks.num_used == 0
    assert decode.connector.poll() == [] and prefill.connector.poll() == []
    if outcome != "timeout":  # the prefill side's send finished, so its blocks were freed too
        assert prefill.blocks.num_used == 0


def test_mismatched_block_counts_fail_cleanly():
    exchange, prefill, decode = pair()
    decode.connector.start_recv(Transfer("x", "prefill", (0, 1, 2), tag=1))
    prefill.connector.start_send(Transfer("x", "decode", (0, 1), tag=1))
    [result] = decode.connector.poll()
    assert result.status is TransferStatus.FAILED and "expected 3" in result.error


def test_unknown_peer_and_duplicate_ids_are_refused():
    exchange, prefill, decode = pair()
    with pytest.raises(TransferError, match="unknown peer"):
        prefill.connector.start_send(Transfer("x", "nobody", (0,), tag=1))
    decode.connector.start_recv(Transfer("y", "prefill", (0,), tag=1))
    with pytest.raises(TransferError, match="already under way"):
        decode.connector.start_recv(Transfer("y", "prefill", (1,), tag=2))
