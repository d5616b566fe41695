"""The torch.distributed connector over gloo between two real processes on loopback.

This process is "prefill-0" and hosts the TCPStore; tests/integration/kv_peer.py is "decode-0" in a subprocess.
"""

import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from pdserve.kv_transfer.connector import Transfer, TransferStatus
from pdserve.kv_transfer.torch_dist import TorchDistConnector

sys.path.insert(0, os.path.dirname(__file__))
from kv_peer import filled_cache, wait_for  # noqa: E402


def test_blocks_move_both_ways_and_every_failure_is_reported_once():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    peer = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "kv_peer.py"), str(store.port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        connector = TorchDistConnector("prefill-0")
        cache = filled_cache(seed=1)
        connector.register(cache)
        connector.connect("decode-0", store, rank=0)

        connector.start_recv(Transfer("t1", "decode-0", (0, 5, 2), tag=1))
        connector.start_send(Transfer("t2", "decode-0", (4, 3), tag=2))  # disjoint from t1
        connector.start_recv(Transfer("t3", "decode-0", (6,), tag=3, timeout_s=1.0))  # sent after 1.5 s
        connector.start_recv(Transfer("t4", "decode-0", (7,), tag=4))
        connector.cancel("t4")
        connector.start_recv(Transfer("t5", "decode-0", (8, 9, 10), tag=5, timeout_s=5.0))  # peer sends 2 blocks
        connector.start_recv(Transfer("t6", "decode-0", (11, 1), tag=6, timeout_s=10.0))  # after all the others
        results = wait_for(connector, 6)
        statuses = {r.transfer_id: r.status for r in results}
        assert statuses == {"t1": TransferStatus.DONE, "t2": TransferStatus.DONE, "t3": TransferStatus.TIMED_OUT,
                            "t4": TransferStatus.CANCELLED, "t5": TransferStatus.FAILED,
                            "t6": TransferStatus.DONE}, results
        assert len(results) == 6  # each transfer reported exactly once
        time.sleep(0.2)
        assert connector.poll() == [] and connector.pending == {}
        # t3's late KV and t4's unwanted KV were drained, t5's wrong-sized KV read to its end: the pair stayed in step
        assert "decode-0" in connector.pairs
        assert torch.equal(cache.read_blocks((0, 5, 2)), filled_cache(seed=2).read_blocks((3, 7, 1)))
        assert torch.equal(cache.read_blocks((11, 1)), filled_cache(seed=2).read_blocks((4, 5)))
        assert torch.equal(cache.read_blocks((6, 7)), filled_cache(seed=1).read_blocks((6, 7)))  # never written
        assert "expected" in next(r for r in results if r.transfer_id == "t5").error
        done = next(r for r in results if r.transfer_id == "t1")
        assert done.bytes == 3 * cache.tensor[:, :, 0].numel() * 4

        store.set("test-done", "1")
        out, err = peer.communicate(timeout=60)
        assert peer.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        assert report["received_ok"] and set(report["statuses"].values()) == {"done"}, report
        connector.shutdown()
    finally:
        if peer.poll() is None:
            peer.kill()
