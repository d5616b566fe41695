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
