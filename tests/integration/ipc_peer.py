"""The far side of test_kv_transfer_ipc: a separate process with its own KV cache on `DEVICE`, paired over IPC.

    python ipc_peer.py STORE_FILE DEVICE
Receives two blocks into (9, 8) with tag 2 and checks they hold the test's blocks (4, 3); sends blocks (3, 7, 1)
with tag 1. Prints one JSON line, then stays paired until the test sets "test-done" in the store (the test may kill
it first).
"""

import json
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from pdserve.kv_transfer.connector import Transfer
from pdserve.kv_transfer.ipc_connector import IpcConnector

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kv_peer import filled_cache  # noqa: E402


def main() -> None:
    store = dist.FileStore(sys.argv[1], 2)
    store.set_timeout(timedelta(seconds=60))
    device = sys.argv[2]
    connector = IpcConnector("decode-0")
    cache = filled_cache(seed=2, device=device)
    connector.register(cache)
    connector.model_fingerprint = "m"
    connector.connect("prefill-0", store, rank=1)
    connector.start_recv(Transfer("t2", "prefill-0", (9, 8), tag=2))
    connector.start_send(Transfer("t1", "prefill-0", (3, 7, 1), tag=1))
    results, deadline = [], time.monotonic() + 30
    while len(results) < 2 and time.monotonic() < deadline:
        results += connector.poll()
        time.sleep(0.002)
    expected = filled_cache(seed=1, device=device).read_blocks((4, 3))
    print(json.dumps({"statuses": {r.transfer_id: r.status.value for r in results},
                      "received_ok": bool(torch.equal(cache.read_blocks((9, 8)), expected))}), flush=True)
    store.get("test-done")
    connector.shutdown()


if __name__ == "__main__":
    main()
