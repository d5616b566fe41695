"""The same-node IPC connector between two real processes: this one is "prefill-0", tests/integration/ipc_peer.py
"decode-0" in a subprocess. Each maps the other's cache (shared memory on CPU, a CUDA IPC handle on a GPU: that
case skips without CUDA), blocks move both ways, and when the peer's process dies the pair is forgotten and a receive
waiting on it fails at once instead of at its deadline; nothing is left in /dev/shm."""

import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from pdserve.kv_transfer.connector import Transfer, TransferStatus
from pdserve.kv_transfer.ipc_connector import IpcConnector

sys.path.insert(0, os.path.dirname(__file__))
from kv_peer import filled_cache, wait_for  # noqa: E402


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA IPC needs a GPU"))])
def test_blocks_move_both_ways_between_processes_and_a_dead_peer_is_forgotten(tmp_path, device):
    shm_before = set(os.listdir("/dev/shm"))
    store_file = str(tmp_path / "store")
    store = dist.FileStore(store_file, 2)
    store.set_timeout(timedelta(seconds=60))
    peer = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "ipc_peer.py"), store_file,
                             device], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        connector = IpcConnector("prefill-0")
        cache = filled_cache(seed=1, device=device)
        connector.register(cache)
        connector.model_fingerprint = "m"
        connector.connect("decode-0", store, rank=0)
        connector.start_recv(Transfer("t1", "decode-0", (0, 5, 2), tag=1))
        connector.start_send(Transfer("t2", "decode-0", (4, 3), tag=2))
        results = wait_for(connector, 2)
        assert {r.transfer_id: r.status for r in results} == {"t1": TransferStatus.DONE, "t2": TransferStatus.DONE}
        assert torch.equal(cache.read_blocks((0, 5, 2)), filled_cache(seed=2, device=device).read_blocks((3, 7, 1)))
        assert next(r for r in results if r.transfer_id == "t1").bytes == 3 * cache.block_bytes
        report = json.loads(peer.stdout.readline())
        assert report == {"statuses": {"t1": "done", "t2": "done"}, "received_ok": True}, report

        connector.start_recv(Transfer("t3", "decode-0", (6,), tag=3, timeout_s=30))  # never sent
        peer.kill()
        peer.wait(10)
        started = time.monotonic()
        results = wait_for(connector, 1, limit_s=10)
        assert [(r.transfer_id, r.status, r.error) for r in results] == [("t3", TransferStatus.FAILED,
                                                                           "the pair broke")]
        assert time.monotonic() - started < 5  # at once, not at its 30 s deadline
        assert "decode-0" not in connector.pairs
        assert torch.equal(cache.read_blocks((6,)), filled_cache(seed=1, device=device).read_blocks((6,)))
        connector.shutdown()
        assert set(os.listdir("/dev/shm")) <= shm_before  # the caches' memory has no name to leave behind
    finally:
        if peer.poll() is None:
            peer.kill()
