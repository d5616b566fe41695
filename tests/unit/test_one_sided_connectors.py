"""The one-sided connectors (`kv_transfer.one_sided`), each with two real ends in this process, each end with its own
KV cache, paired over one store: NIXL (two NIXL agents over UCX; skipped where the nixl package is not installed)
and same-node IPC (each end maps the other's shared-memory cache and they talk over a real Unix socket). Blocks move
by one-sided READs, in place, whatever the order of receive and notice; every outcome is reported once on each
side; a receive that expected another size, one cancelled and one timed out tell the sender not to wait. Then what
only IPC has: pairs across nodes refused, a peer whose line closes forgotten, no room in /dev/shm said by name."""

import time

import pytest
import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer import shared_cache
from pdserve.kv_transfer.channel import PEER_ABORTED
from pdserve.kv_transfer.connector import Transfer, TransferError, TransferStatus
from pdserve.kv_transfer.ipc_connector import IpcConnector
from pdserve.kv_transfer.layout import PairRefused
from pdserve.kv_transfer.one_sided import OneSidedConnector, common_runs
from pdserve.kv_transfer.send_delay import InjectedPause
from tests.unit import kv_pairing
from tests.unit.kv_pairing import join

TINY = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position=256,
                   tie_word_embeddings=True)


def cache(seed: int, num_blocks: int) -> KVCache:
    kv = KVCache(TINY, num_blocks=num_blocks, block_size=4, dtype=torch.float32, device="cpu")
    kv.tensor.copy_(torch.randn(kv.tensor.shape, generator=torch.Generator().manual_seed(seed)))
    return kv


_agents = iter(range(1_000_000))


@pytest.fixture(params=["ipc", "nixl"])
def kind(request) -> str:
    if request.param == "nixl":
        pytest.importorskip("nixl._api")
    return request.param


def connector(kind: str, worker_id: str) -> OneSidedConnector:
    if kind == "nixl":
        from pdserve.kv_transfer.nixl_connector import NixlConnector
        return NixlConnector(worker_id)
    return IpcConnector(worker_id)


def registered(kind: str, model: str = "m", n: int | None = None) -> tuple[OneSidedConnector, OneSidedConnector]:
    """A prefill and a decode connector (names unique in this process), each with its cache; the decode cache is
    larger, so block addresses differ between the two."""
    n = next(_agents) if n is None else n
    prefill, decode = connector(kind, f"prefill-{n}"), connector(kind, f"decode-{n}")
    prefill.register(cache(1, 24))
    decode.register(cache(2, 40))
    prefill.model_fingerprint, decode.model_fingerprint = "m", model
    return prefill, decode


def pair(kind: str, model: str = "m") -> tuple[OneSidedConnector, OneSidedConnector]:
    """`registered`, and paired."""
    prefill, decode = registered(kind, model)
    errors = join(prefill, decode)
    if errors:
        raise errors[0]
    return prefill, decode


def outcomes(*sides: OneSidedConnector, count: int, limit_s: float = 20.0) -> dict:
    """(role, transfer id) -> result."""
    found = kv_pairing.outcomes(*sides, count=count, limit_s=limit_s)
    return {(worker.split("-")[0], transfer): result for (worker, transfer), result in found.items()}


def test_common_runs_cut_where_either_side_breaks():
    assert common_runs((1, 2, 3, 4), (7, 8, 20, 21)) == [(0, 2), (2, 2)]
    assert common_runs((5, 9), (1, 2)) == [(0, 1), (1, 1)]
    assert common_runs((), ()) == []


def test_blocks_move_in_place_whichever_comes_first(kind):
    prefill, decode = pair(kind)
    sources = {"a": (3, 4, 5, 9), "b": (0, 20, 7), "c": (11,)}
    targets = {"a": (30, 31, 2, 3), "b": (12, 13, 14), "c": (39,)}
    decode.start_recv(Transfer("a", prefill.worker_id, targets["a"], tag=1, timeout_s=10))  # posted first
    for tag, request in enumerate(("a", "b", "c"), start=1):
        prefill.start_send(Transfer(request, decode.worker_id, sources[request], tag=tag, timeout_s=10))
    found = outcomes(prefill, decode, count=2)
    time.sleep(0.05)  # b's and c's notifications arrive before their receives
    decode.start_recv(Transfer("c", prefill.worker_id, targets["c"], tag=3, timeout_s=10))
    decode.start_recv(Transfer("b", prefill.worker_id, targets["b"], tag=2, timeout_s=10))
    found.update(outcomes(prefill, decode, count=4))
    assert {r.status for r in found.values()} == {TransferStatus.DONE}, found
    for request, source in sources.items():
        assert torch.equal(decode.kv_cache.read_blocks(targets[request]), prefill.kv_cache.read_blocks(source))
    assert found[("decode", "a")].bytes == 4 * decode.kv_cache.tensor[:, :, 0].numel() * 4
    prefill.shutdown()
    decode.shutdown()


def test_every_outcome_is_reported_once_and_the_sender_is_told_not_to_wait(kind):
    prefill, decode = pair(kind)
    peer_p, peer_d = prefill.worker_id, decode.worker_id
    prefill.start_send(Transfer("wrong-size", peer_d, (1, 2), tag=1, timeout_s=10))
    decode.start_recv(Transfer("wrong-size", peer_p, (5, 6, 7), tag=1, timeout_s=10))
    prefill.start_send(Transfer("unwanted", peer_d, (3,), tag=2, timeout_s=10))
    decode.start_recv(Transfer("unwanted", peer_p, (8,), tag=2, timeout_s=10))
    decode.cancel("unwanted")
    decode.start_recv(Transfer("late", peer_p, (9,), tag=3, timeout_s=0.2))
    prefill.start_send(Transfer("no-kv", peer_d, (), tag=4, timeout_s=10))
    decode.start_recv(Transfer("no-kv", peer_p, (10,), tag=4, timeout_s=10))
    found = outcomes(prefill, decode, count=7)
    assert {key: r.status for key, r in found.items()} == {
        ("decode", "wrong-size"): TransferStatus.FAILED, ("prefill", "wrong-size"): TransferStatus.CANCELLED,
        ("decode", "unwanted"): TransferStatus.CANCELLED, ("prefill", "unwanted"): TransferStatus.CANCELLED,
        ("decode", "late"): TransferStatus.TIMED_OUT,
        ("decode", "no-kv"): TransferStatus.FAILED, ("prefill", "no-kv"): TransferStatus.DONE}
    assert found[("decode", "wrong-size")].error == "sent 2 blocks, expected 3"
    assert found[("decode", "no-kv")].error == PEER_ABORTED
    assert torch.equal(decode.kv_cache.read_blocks((5, 6, 7, 8, 9, 10)), cache(2, 40).read_blocks((5, 6, 7, 8, 9, 10)))
    assert prefill._sends == {} and decode._receives == {}
    prefill.shutdown()
    decode.shutdown()


def test_workers_of_different_models_refuse_to_pair(kind):
    with pytest.raises(PairRefused, match="model"):
        pair(kind, model="another")


def test_a_send_held_past_its_receive_deadline_is_dropped_by_both(kind):
    """Fault injection holds a send's notification (as `faults.kv_send_pause_s` does on a cluster)."""
    prefill, decode = pair(kind)
    prefill.send_delay = InjectedPause(1.0, count=1)
    prefill.start_send(Transfer("held", decode.worker_id, (1, 2), tag=1, timeout_s=10))
    decode.start_recv(Transfer("held", prefill.worker_id, (3, 4), tag=1, timeout_s=0.3))
    found = outcomes(prefill, decode, count=2)
    assert found[("decode", "held")].status is TransferStatus.TIMED_OUT
    assert found[("prefill", "held")].status is TransferStatus.CANCELLED
    assert found[("prefill", "held")].seconds < 1.0  # told at once, not after its own wait
    prefill.start_send(Transfer("next", decode.worker_id, (5,), tag=2, timeout_s=10))  # the pause was for one send
    decode.start_recv(Transfer("next", prefill.worker_id, (6,), tag=2, timeout_s=10))
    assert {r.status for r in outcomes(prefill, decode, count=2).values()} == {TransferStatus.DONE}
    prefill.shutdown()
    decode.shutdown()


def test_ipc_views_taken_before_sharing_see_what_a_peer_writes():
    """The engine takes its per-layer views of the cache before the connector moves it into shared memory."""
    prefill, decode = IpcConnector("prefill-v"), IpcConnector("decode-v")
    source, target = cache(1, 24), cache(2, 40)
    k_before, v_before = target.layer(2)  # [blocks, BS, H_kv, D] views
    prefill.register(source)
    decode.register(target)
    assert target.tensor.is_shared()
    prefill.model_fingerprint = decode.model_fingerprint = "m"
    assert join(prefill, decode) == []
    prefill.start_send(Transfer("x", decode.worker_id, (7,), tag=1, timeout_s=10))
    decode.start_recv(Transfer("x", prefill.worker_id, (33,), tag=1, timeout_s=10))
    assert {r.status for r in outcomes(prefill, decode, count=2).values()} == {TransferStatus.DONE}
    assert torch.equal(k_before[33], source.tensor[0, 2, 7]) and torch.equal(v_before[33], source.tensor[1, 2, 7])
    prefill.shutdown()
    decode.shutdown()


def test_ipc_refuses_a_pair_across_nodes_on_both_sides():
    prefill, decode = registered("ipc")
    decode.node = "another-host/another-boot"
    errors = join(prefill, decode)
    assert len(errors) == 2 and all("different nodes" in str(e) for e in errors), errors
    assert prefill.pairs == {} and decode.pairs == {}


def test_ipc_forgets_a_peer_whose_line_closed_and_fails_what_waits_on_it():
    prefill, decode = pair("ipc")
    decode.start_recv(Transfer("waiting", prefill.worker_id, (1, 2), tag=1, timeout_s=30))
    prefill.start_send(Transfer("sent", decode.worker_id, (3,), tag=2, timeout_s=30))
    prefill.shutdown()  # closes its end of the line, as a worker that stops or dies does
    found = outcomes(decode, count=1, limit_s=5)
    assert found[("decode", "waiting")].status is TransferStatus.FAILED
    assert found[("decode", "waiting")].error == "the pair broke"
    assert prefill.worker_id not in decode.pairs  # out of its heartbeat: the router forms the pair again
    with pytest.raises(TransferError, match="connect first"):
        decode.start_recv(Transfer("after", prefill.worker_id, (4,), tag=3))
    decode.shutdown()


def test_ipc_says_when_shared_memory_has_no_room(monkeypatch):
    monkeypatch.setattr(shared_cache, "SHM_HEADROOM", 1e12)
    kv = cache(1, 24)
    with pytest.raises(TransferError, match="/dev/shm has .* MiB free"):
        IpcConnector("prefill-full").register(kv)
    assert not kv.tensor.is_shared()  # left where it was


def test_ipc_says_when_the_peers_cache_cannot_be_opened():
    with pytest.raises(TransferError, match=r"cannot open the peer's KV cache \(/proc/"):
        shared_cache.open_shared({"kind": "cpu", "pid": 2**22 + 1, "fd": 3, "size": 64, "shape": [16],
                                  "dtype": "float32"})


def test_discarded_kv_is_never_read_and_its_sender_is_told_not_to_wait(kind):
    """Whether its "send" notice came before the discard or after, nothing is read into the decode cache."""
    prefill, decode = pair(kind)
    before = decode.kv_cache.tensor.clone()
    prefill.start_send(Transfer("early", decode.worker_id, (1, 2), tag=1, timeout_s=10))
    deadline = time.monotonic() + 10
    while (prefill.worker_id, 1) not in decode._notices and time.monotonic() < deadline:
        decode.poll()
        prefill.poll()
        time.sleep(0.005)
    decode.discard(prefill.worker_id, 1)
    decode.discard(prefill.worker_id, 2)
    prefill.start_send(Transfer("late", decode.worker_id, (3,), tag=2, timeout_s=10))
    found = outcomes(prefill, decode, count=2)
    assert {key: r.status for key, r in found.items()} == {
        ("prefill", "early"): TransferStatus.CANCELLED, ("prefill", "late"): TransferStatus.CANCELLED}
    assert torch.equal(decode.kv_cache.tensor, before)
    assert decode._notices == {} and decode._discarding == {}
    prefill.shutdown()
    decode.shutdown()
