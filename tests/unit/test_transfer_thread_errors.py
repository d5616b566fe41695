"""A KV channel thread that hits an unexpected error (a bug, not a transport failure) reports the transfer FAILED
and breaks the pair (its state is unknown) instead of dying unobserved, which leaked the sender's blocks and left the
receiver's request hanging. A send that waited for its turn on the pair past its deadline sends "no KV" instead of
its blocks, so the read its receiver queued for it still has a transfer to take, and the pair stays in step."""

import time

import torch

from pdserve.engine.kv_cache import KVCache
from pdserve.engine.shapes import shape
from pdserve.kv_transfer.connector import Transfer, TransferStatus
from pdserve.kv_transfer.torch_dist import TorchDistConnector


def connector() -> TorchDistConnector:
    made = TorchDistConnector("prefill-0")
    made.register(KVCache(shape("smollm2-135m"), num_blocks=4, block_size=16, dtype=torch.float32, device="cpu"))
    return made


def results_of(made: TorchDistConnector, count: int) -> dict:
    results, deadline = {}, time.monotonic() + 10
    while len(results) < count and time.monotonic() < deadline:
        results.update({r.transfer_id: r for r in made.poll()})
        time.sleep(0.01)
    return results


class BuggyGroup:
    """A process group whose every call raises what no transport raises."""

    def send(self, *args, **kwargs):
        raise ValueError("a bug in the transfer path")

    recv = send


def test_an_unexpected_error_in_a_channel_thread_is_reported_and_breaks_the_pair():
    made = connector()
    made.add_pair("decode-0", BuggyGroup(), 1)
    made.start_send(Transfer("t1", "decode-0", (0, 1), tag=7, timeout_s=5.0))
    results = results_of(made, 1)
    assert [(r.transfer_id, r.status) for r in results.values()] == [("t1", TransferStatus.FAILED)]
    assert results["t1"].error.startswith("ValueError: a bug in the transfer path")
    assert "decode-0" not in made.pairs and made.pending == {}
    made.shutdown()


class SlowWork:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def wait(self, timeout=None) -> bool:
        time.sleep(self.seconds)
        return True


class SlowGroup:
    """Every message takes `seconds` on the wire; records each message's first value."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.sent = seconds, []

    def send(self, tensors, rank, tag):
        self.sent.append(tensors[0].reshape(-1)[:4].tolist())
        return SlowWork(self.seconds)

    recv = send


def test_a_send_that_waits_for_its_turn_past_its_deadline_sends_no_kv_and_the_pair_goes_on():
    made = connector()
    group = SlowGroup(0.02)
    made.add_pair("decode-0", group, 1)
    made.start_send(Transfer("first", "decode-0", (0, 1), tag=1, timeout_s=10.0))  # 62 messages of 20 ms each
    made.start_send(Transfer("queued", "decode-0", (2, 3), tag=2, timeout_s=0.5))
    results = results_of(made, 2)
    assert results["first"].status is TransferStatus.DONE
    assert results["queued"].status is TransferStatus.TIMED_OUT
    headers = [message for message in group.sent if len(message) == 4 and message[0] == 3]  # HEADER_VERSION 3
    assert [h[1:3] for h in headers] == [[1, 2], [2, 0]]  # (tag, blocks): the queued one's header says "no KV"
    assert len(group.sent) == 1 + 1 + 2 * 30 + 1  # first: header, lengths, K and V of 30 layers; queued: header
    assert "decode-0" in made.pairs  # the receiver's read took the "no KV": still in step
    made.shutdown()
