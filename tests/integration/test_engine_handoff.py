"""Prefill in one process, KV handed over a pair (gloo, and NIXL where it is installed), decode in another: greedy
output equals one engine's."""

import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from pdserve.engine import SamplingParams
from pdserve.kv_transfer.backends import make_connector
from pdserve.kv_transfer.connector import Transfer, TransferStatus

from .test_smollm2_oracle import PROMPTS

GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.mark.parametrize("backend", ["gloo", "nixl"])
def test_handoff_matches_single_engine(engine, tmp_path, backend):
    if backend == "nixl":
        pytest.importorskip("nixl._api")
    single = engine.generate(PROMPTS, GREEDY)
    prompts = [list(o.prompt_token_ids) for o in single]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=120), wait_for_workers=False)
    peer = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "prefill_peer.py"),
                             str(store.port), str(tmp_path / "prompts.json"), backend],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        connector = make_connector("decode", backend)
        connector.register(engine.kv_cache)
        connector.connect("prefill", store, rank=1)
        for i, ids in enumerate(prompts):
            blocks = engine.reserve_remote(f"h{i}", ids, GREEDY)
            connector.start_recv(Transfer(f"h{i}", "prefill", blocks, tag=i, timeout_s=120))
        final, deadline = {}, time.monotonic() + 300
        while len(final) < len(prompts) and time.monotonic() < deadline:
            for result in connector.poll():
                assert result.status is TransferStatus.DONE, result
                i = int(result.transfer_id[1:])
                engine.commit_remote(result.transfer_id, int(store.get(f"first/{i}")))
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out.token_ids
        assert [final[f"h{i}"] for i in range(len(prompts))] == [o.token_ids for o in single]
        assert engine.blocks.num_used == 0
        store.set("test-done", "1")
        out, err = peer.communicate(timeout=120)
        assert peer.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1]) == {"blocks_used": 0}
        connector.shutdown()
    finally:
        if peer.poll() is None:
            peer.kill()
