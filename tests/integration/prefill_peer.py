"""The prefill side of test_engine_handoff: a real SmolLM2 engine in its own process.

    python prefill_peer.py PORT PROMPTS.json BACKEND
Prefills each prompt (prefill-only), publishes its first token in the store as first/<i>, pushes its KV blocks to
"decode" with tag i, and releases its blocks when each send is reported. Prints {"blocks_used": n} at the end.
"""

import json
import sys
import time
from datetime import timedelta

import torch.distributed as dist

from pdserve.engine import Engine, EngineConfig, FinishReason, SamplingParams
from pdserve.kv_transfer.backends import make_connector
from pdserve.kv_transfer.connector import Transfer


def main() -> None:
    store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, timeout=timedelta(seconds=120))
    with open(sys.argv[2]) as f:
        prompts = json.load(f)
    engine = Engine(EngineConfig(max_num_batched_tokens=256, num_kv_blocks=512, num_threads=1))
    connector = make_connector("prefill", sys.argv[3])
    connector.register(engine.kv_cache)
    connector.connect("decode", store, rank=0)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, SamplingParams(max_tokens=24, temperature=0), prefill_only=True)
    sent = 0
    while sent < len(prompts):
        for out in engine.step():
            if out.finish_reason is not FinishReason.PREFILLED:
                raise RuntimeError(f"request {out.request_id} ended at its first token: {out}")
            store.set(f"first/{out.request_id}", str(out.new_token_ids[0]))
            connector.start_send(Transfer(out.request_id, "decode", engine.held_block_ids(out.request_id),
                                          tag=int(out.request_id)))
        for result in connector.poll():
            engine.release(result.transfer_id)  # on every outcome
            sent += 1
        time.sleep(0.001)
    print(json.dumps({"blocks_used": engine.blocks.num_used}), flush=True)
    store.get("test-done")
    connector.shutdown()


if __name__ == "__main__":
    main()
