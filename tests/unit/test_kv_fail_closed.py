"""A KV handoff fails closed (`kv_transfer.layout`): two workers whose models or KV layouts differ refuse to pair,
naming every difference; a header of another layout (a stream out of step) is refused naming each field; with
checksums on, bytes changed on the wire fail that transfer only, and the pair goes on. Two real gloo ranks, one per
thread, in this process."""

import pytest
import torch

from pdserve.engine.fingerprint import model_fingerprint
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.shapes import shape
from pdserve.kv_transfer.connector import Transfer, TransferStatus
from pdserve.kv_transfer.layout import HeaderMismatch, KVLayout, check_header
from pdserve.kv_transfer.torch_dist import TorchDistConnector
from tests.unit.kv_pairing import join, outcomes

MODEL = shape("smollm2-135m")
BLOCKS = 8


def cache(seed: int, block_size: int = 16) -> KVCache:
    kv = KVCache(MODEL, num_blocks=BLOCKS, block_size=block_size, dtype=torch.float32, device="cpu")
    kv.tensor.copy_(torch.randn(kv.tensor.shape, generator=torch.Generator().manual_seed(seed)))
    return kv


def connector(worker_id: str, kv: KVCache, checksums: bool = True, model: str = "m1") -> TorchDistConnector:
    made = TorchDistConnector(worker_id, checksums=checksums)
    made.register(kv)
    made.model_fingerprint = model
    return made


def move(sender, receiver, transfer_id: str, tag: int, source=(1, 2, 3), target=(4, 5, 6)) -> dict:
    receiver.start_recv(Transfer(transfer_id, sender.worker_id, target, tag=tag, timeout_s=10))
    sender.start_send(Transfer(transfer_id, receiver.worker_id, source, tag=tag, timeout_s=10))
    return outcomes(sender, receiver, count=2)


def test_blocks_move_with_checksums_and_land_intact():
    prefill, decode = connector("prefill-0", cache(1)), connector("decode-0", cache(2))
    assert join(prefill, decode) == []
    results = move(prefill, decode, "t1", tag=1)
    assert {r.status for r in results.values()} == {TransferStatus.DONE}
    assert torch.equal(decode.kv_cache.read_blocks((4, 5, 6)), prefill.kv_cache.read_blocks((1, 2, 3)))


def test_workers_of_different_models_or_layouts_refuse_to_pair_naming_the_difference():
    prefill = connector("prefill-0", cache(1), model="m1")
    decode = connector("decode-0", cache(2, block_size=32), checksums=False, model="m2")
    errors = join(prefill, decode)
    assert len(errors) == 2 and prefill.pairs == {} and decode.pairs == {}
    for error in errors:
        for field in ("model", "block_size", "checksums"):
            assert f"{field}:" in str(error)
        assert "kv_heads" not in str(error)


class CorruptingGroup:
    """A gloo group whose third message (a transfer's first data message, after the header and the piece lengths)
    has one value changed on its way."""

    def __init__(self, group) -> None:
        self.group, self.sent = group, 0

    def send(self, tensors, rank, tag):
        self.sent += 1
        if self.sent == 3:
            tensors = [tensors[0].clone()]
            tensors[0].view(-1)[7] += 1.0
        return self.group.send(tensors, rank, tag)

    def recv(self, tensors, rank, tag):
        return self.group.recv(tensors, rank, tag)


def test_bytes_changed_on_the_wire_fail_that_transfer_only():
    prefill, decode = connector("prefill-0", cache(1)), connector("decode-0", cache(2))
    assert join(prefill, decode) == []
    prefill.pairs["decode-0"].group = CorruptingGroup(prefill.pairs["decode-0"].group)
    first = move(prefill, decode, "t1", tag=1)
    assert first[("decode-0", "t1")].status is TransferStatus.FAILED
    assert first[("decode-0", "t1")].error.startswith("checksum: layers [0] of 30")
    assert first[("prefill-0", "t1")].status is TransferStatus.DONE
    second = move(prefill, decode, "t2", tag=2)  # the pair is still in step
    assert {r.status for r in second.values()} == {TransferStatus.DONE}
    assert "decode-0" in prefill.pairs and "prefill-0" in decode.pairs
    assert torch.equal(decode.kv_cache.read_blocks((4, 5, 6)), prefill.kv_cache.read_blocks((1, 2, 3)))


def test_a_header_of_another_layout_is_refused_naming_each_field():
    layout = KVLayout(30, 16, 3, 64, "float32", True, model_fingerprint(MODEL, None))
    assert check_header(layout.header(tag=5, blocks=3, pieces=2), layout) == (5, 3, 2)
    other_model = KVLayout(30, 16, 3, 64, "bfloat16", True, "0123456789abcdef")
    with pytest.raises(HeaderMismatch, match="dtype .* model") as refused:
        check_header(other_model.header(tag=5, blocks=3, pieces=1), layout)
    assert "tag" not in str(refused.value) and "blocks" not in str(refused.value)


def test_the_fingerprint_tells_two_models_of_one_shape_apart():
    torch.manual_seed(0)
    a, b = torch.randn(100, 64), torch.randn(100, 64)
    assert model_fingerprint(MODEL, a) == model_fingerprint(MODEL, a.clone())
    assert model_fingerprint(MODEL, a) != model_fingerprint(MODEL, b)
    assert model_fingerprint(MODEL, a) != model_fingerprint(shape("llama-3-8b"), a)
