"""A KV transfer thread that hits an unexpected error (a bug, not a transport failure) reports the transfer FAILED
and closes the pair (its state is unknown) instead of dying unobserved, which leaked the sender's blocks and left the
receiver's request hanging."""

import time

import torch

from pdserve.engine.kv_cache import KVCache
from pdserve.engine.shapes import shape
from pdserve.kv_transfer.connector import Transfer, TransferStatus
from pdserve.kv_transfer.torch_dist import TorchDistConnector, _Pair


class BuggyGroup:
    """A process group whose every call raises what no transport raises."""

    def send(self, *args, **kwargs):
        raise ValueError("a bug in the transfer path")

    recv = send


def test_an_unexpected_error_in_a_transfer_thread_is_reported_and_breaks_the_pair():
    connector = TorchDistConnector("prefill-0")
    connector.register(KVCache(shape("smollm2-135m"), num_blocks=4, block_size=16, dtype=torch.float32,
                               device="cpu"))
    connector.pairs["decode-0"] = _Pair(BuggyGroup(), 1)
    connector.start_send(Transfer("t1", "decode-0", (0, 1), tag=7, timeout_s=5.0))
    results, deadline = [], time.monotonic() + 10
    while not results and time.monotonic() < deadline:
        results = connector.poll()
        time.sleep(0.01)
    assert [(r.transfer_id, r.status) for r in results] == [("t1", TransferStatus.FAILED)]
    assert results[0].error.startswith("ValueError: a bug in the transfer path")
    assert "decode-0" not in connector.pairs and connector.pending == {}
    connector.shutdown()


class SlowWork:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def wait(self, timeout=None) -> bool:
        time.sleep(self.seconds)
        return True


class SlowGroup:
    """Every message takes `seconds` on the wire; counts the messages posted."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.posted = seconds, 0

    def send(self, tensors, rank, tag):
        self.posted += 1
        return SlowWork(self.seconds)

    recv = send


def test_a_transfer_that_waits_for_a_thread_past_its_deadline_fails_without_touching_the_wire():
    """Its deadline runs from submission; while it waits it holds no staging (staging is bounded by the threads)."""
    connector = TorchDistConnector("prefill-0", max_concurrent=1, layers_per_message=30)
    connector.register(KVCache(shape("smollm2-135m"), num_blocks=4, block_size=16, dtype=torch.float32,
                               device="cpu"))
    group = SlowGroup(0.6)
    connector.pairs["decode-0"] = _Pair(group, 1)
    connector.start_send(Transfer("first", "decode-0", (0, 1), tag=1, timeout_s=10.0))
    connector.start_send(Transfer("queued", "decode-0", (2, 3), tag=2, timeout_s=0.5))
    time.sleep(0.2)
    assert connector.pending["queued"].staging == [] and len(connector.pending["first"].staging) == 1
    results, deadline = {}, time.monotonic() + 10
    while len(results) < 2 and time.monotonic() < deadline:
        results.update({r.transfer_id: r for r in connector.poll()})
        time.sleep(0.01)
    assert results["first"].status is TransferStatus.DONE
    assert results["queued"].status is TransferStatus.TIMED_OUT
    assert results["queued"].error == "waited for a transfer thread past its deadline"
    assert group.posted == 2  # the first transfer's header and its one layer group; nothing of the queued one
    assert "decode-0" not in connector.pairs  # its peer's side is posted: the pair is formed again
    connector.shutdown()
