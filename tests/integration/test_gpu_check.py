"""`bench/gpu_check.py` (what scripts/gpu_check.sh runs on a GPU) at its CPU size, so the script cannot rot where
CI has no GPU: every row runs without error, fp32 greedy tokens equal transformers', and it writes both files. It runs
without the packages the GPU machines lack (Ray, Redis, gguf, FastAPI, llguidance), as it will there."""

import json
import subprocess
import sys
from pathlib import Path

ABSENT_ON_DEVICE = "ray,redis,gguf,fastapi,uvicorn,multipart,python_multipart,llguidance,nixl"


def test_gpu_check_quick_on_cpu(tmp_path):
    without = Path(__file__).with_name("without_packages.py")
    done = subprocess.run([sys.executable, str(without), ABSENT_ON_DEVICE, "pdserve.bench.gpu_check", "--device",
                           "cpu", "--quick", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = [(c["name"], c["error"]) for c in report["checks"] if c["error"]]
    assert not failed, failed
    by_name = {(c["section"], c["name"]): c["detail"] for c in report["checks"]}
    assert by_name[("correctness", "fp32, torch attention")]["agreement"] == 1.0
    assert all(d["tok_s"] > 0 for (section, name), d in by_name.items() if section == "decode" and "batch" in name)
    assert "| decode | int8: batch 4 |" in (tmp_path / "gpu_check.md").read_text()
    assert by_name[("verify", "fp32: batch 4, k 8")]["ms"] > 0
    assert by_name[("verify", "fp32: batch 1, k 0")]["vs_k0"] == 1
    assert by_name[("kv", "fp32: handoff in place over the loopback")]["intact"]
    assert by_name[("kv", "fp32: IPC handoff, two processes (CUDA IPC on a GPU)")]["intact"]
    beside = by_name[("kv", "fp32: decode batch 8 beside handoffs")]
    assert beside["handoffs"] > 0 and beside["alone_ms"] > 0 and beside["beside_ms"] > 0
