"""`kv_transfer.backend: auto` (`kv_transfer.per_pair`): two real ends in this process, paired over one store, each
choosing the same way: IPC when both share a node and can share their caches, else gloo (real gloo sockets on
loopback). Blocks move either way, and the worker's pairs list shows each pair once, whichever connector holds it."""


import pytest
import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer import shared_cache
from pdserve.kv_transfer.connector import Transfer, TransferError, TransferStatus
from pdserve.kv_transfer.per_pair import PerPairConnector
from tests.unit.kv_pairing import join, outcomes

TINY = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position=256,
                   tie_word_embeddings=True)
_names = iter(range(1_000_000))


def cache(seed: int, num_blocks: int) -> KVCache:
    kv = KVCache(TINY, num_blocks=num_blocks, block_size=4, dtype=torch.float32, device="cpu")
    kv.tensor.copy_(torch.randn(kv.tensor.shape, generator=torch.Generator().manual_seed(seed)))
    return kv


def registered(name: str, seed: int, checksums: bool = False, model: str = "m") -> PerPairConnector:
    side = PerPairConnector(f"{name}-{next(_names)}", checksums=checksums)
    side.register(cache(seed, 24 if name == "prefill" else 40))
    side.model_fingerprint = model
    return side


def hand_off(prefill: PerPairConnector, decode: PerPairConnector) -> dict:
    prefill.start_send(Transfer("r", decode.worker_id, (3, 4, 9), tag=1, timeout_s=10))
    decode.start_recv(Transfer("r", prefill.worker_id, (30, 2, 3), tag=1, timeout_s=10))
    found = {key: r.status for key, r in outcomes(prefill, decode, count=2).items()}
    assert torch.equal(decode.network.kv_cache.read_blocks((30, 2, 3)), prefill.network.kv_cache.read_blocks((3, 4, 9)))
    return found


def check_pair(prefill: PerPairConnector, decode: PerPairConnector, over: str) -> None:
    assert join(prefill, decode) == []
    assert prefill.transport(decode.worker_id) == decode.transport(prefill.worker_id) == over
    assert set(prefill.pairs) == {decode.worker_id} and set(decode.pairs) == {prefill.worker_id}
    assert set(hand_off(prefill, decode).values()) == {TransferStatus.DONE}
    prefill.shutdown()
    decode.shutdown()


def test_workers_of_one_node_pair_over_ipc():
    check_pair(registered("prefill", 1), registered("decode", 2), "ipc")


def test_workers_of_other_nodes_pair_over_the_network():
    prefill, decode = registered("prefill", 1), registered("decode", 2)
    decode.ipc.node = "another-host/another-boot"
    check_pair(prefill, decode, "gloo")


def test_a_worker_that_cannot_share_its_cache_pairs_over_the_network(monkeypatch):
    prefill = registered("prefill", 1)
    monkeypatch.setattr(shared_cache, "SHM_HEADROOM", 1e12)  # this one's /dev/shm "has no room"
    decode = registered("decode", 2)
    assert decode.ipc is None and not decode.network.kv_cache.tensor.is_shared()
    check_pair(prefill, decode, "gloo")


def test_checksums_keep_every_pair_on_the_network():
    check_pair(registered("prefill", 1, checksums=True), registered("decode", 2, checksums=True), "gloo")


def test_a_layout_refusal_is_not_hidden_by_the_fallback():
    errors = join(registered("prefill", 1), registered("decode", 2, model="another"))
    assert len(errors) == 2 and all("model" in str(e) for e in errors), errors


def test_transfers_go_only_to_a_paired_peer_and_once():
    prefill, decode = registered("prefill", 1), registered("decode", 2)
    with pytest.raises(TransferError, match="connect first"):
        prefill.start_send(Transfer("r", decode.worker_id, (1,), tag=1))
    assert join(prefill, decode) == []
    prefill.start_send(Transfer("r", decode.worker_id, (1,), tag=1))
    with pytest.raises(TransferError, match="already under way"):
        prefill.start_send(Transfer("r", decode.worker_id, (2,), tag=2))
    prefill.cancel("r")  # goes to the pair's connector: reported CANCELLED once the receiver has read it
    decode.start_recv(Transfer("r", prefill.worker_id, (5,), tag=1))
    found = {key: r.status for key, r in outcomes(prefill, decode, count=2).items()}
    assert found == {(prefill.worker_id, "r"): TransferStatus.CANCELLED, (decode.worker_id, "r"): TransferStatus.DONE}
    assert prefill._owners == {} and decode._owners == {}
    prefill.shutdown()
    decode.shutdown()


@pytest.mark.parametrize("nodes", ["one node", "two nodes"])
def test_a_pair_formed_again_replaces_the_one_before(nodes):
    prefill, decode = registered("prefill", 1), registered("decode", 2)
    if nodes == "two nodes":
        decode.ipc.node = "another-host/another-boot"
    assert join(prefill, decode, generation=1) == []
    assert join(prefill, decode, generation=2) == []  # as the workers do when the router forms it again
    assert set(hand_off(prefill, decode).values()) == {TransferStatus.DONE}
    assert len(prefill.pairs) == len(decode.pairs) == 1
    prefill.shutdown()
    decode.shutdown()
