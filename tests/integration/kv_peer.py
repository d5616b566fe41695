"""The far side of test_kv_transfer_gloo: a separate process with its own KV cache, driven by a fixed script.

    python kv_peer.py PORT
Sends blocks (3, 7, 1) with tag 1, receives two blocks into (9, 8) with tag 2 and checks they hold the expected
data; then sends tag 4 (the test cancelled its receive), two blocks with tag 5 (the test expects three: a size
mismatch), after 1.5 s tag 3 (the test's receive timed out after 1 s) and last (4, 5) with tag 6. Prints one JSON
line, then stays connected until the test sets "test-done" in the store.
"""

import json
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer.connector import Transfer
from pdserve.kv_transfer.torch_dist import TorchDistConnector

TINY = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position=256,
                   tie_word_embeddings=True)


def filled_cache(seed: int, device: str = "cpu") -> KVCache:
    cache = KVCache(TINY, num_blocks=12, block_size=4, dtype=torch.float32, device=device)
    cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=torch.Generator().manual_seed(seed)))
    return cache


def wait_for(connector: TorchDistConnector, count: int, limit_s: float = 30.0) -> list:
    results, deadline = [], time.monotonic() + limit_s
    while len(results) < count and time.monotonic() < deadline:
        results += connector.poll()
        time.sleep(0.005)
    return results


def main() -> None:
    store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, timeout=timedelta(seconds=30))
    connector = TorchDistConnector("decode-0")
    cache = filled_cache(seed=2)
    connector.register(cache)
    connector.connect("prefill-0", store, rank=1)
    connector.start_send(Transfer("t1", "prefill-0", (3, 7, 1), tag=1))
    connector.start_recv(Transfer("t2", "prefill-0", (9, 8), tag=2))
    results = wait_for(connector, 2)
    expected = filled_cache(seed=1).read_blocks((4, 3))
    connector.start_send(Transfer("t4", "prefill-0", (2,), tag=4))
    connector.start_send(Transfer("t5", "prefill-0", (0, 1), tag=5, timeout_s=3))
    time.sleep(1.5)
    connector.start_send(Transfer("t3", "prefill-0", (6,), tag=3))
    connector.start_send(Transfer("t6", "prefill-0", (4, 5), tag=6))
    results += wait_for(connector, 4)
    print(json.dumps({"statuses": {r.transfer_id: r.status.value for r in results},
                      "received_ok": bool(torch.equal(cache.read_blocks((9, 8)), expected))}), flush=True)
    store.get("test-done")  # stay connected until the test has seen its timeouts
    connector.shutdown()


if __name__ == "__main__":
    main()
