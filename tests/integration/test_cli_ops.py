"""The ops commands against a real cluster: `pdserve status`, `scale`, `drain`, `logs`, their --json output and
exit codes. The commands run in this process (`pdserve.cli.main`, as the console script does; a subprocess would
spend seconds importing torch each time). The shared basic cluster is scaled up and drained back to its own size,
so it leaves as it came."""

import json
import subprocess
import time

import pytest

from pdserve.cli import main
from pdserve.client import SyncClient
from pdserve.engine import SamplingParams

pytestmark = pytest.mark.model

MEMBERSHIP_WAIT_S = 15


@pytest.fixture
def pdserve(basic_cluster, monkeypatch, capsys):
    """`pdserve ARGS` against the basic cluster -> CompletedProcess(args, returncode, stdout, stderr)."""
    def run(*args: str, state_dir: str | None = None) -> subprocess.CompletedProcess:
        monkeypatch.setenv("PDSERVE_STATE_DIR", state_dir or basic_cluster.state_dir)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def _status(pdserve) -> dict:
    done = pdserve("status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _wait_for_workers(pdserve, count: int) -> dict:
    deadline = time.monotonic() + MEMBERSHIP_WAIT_S
    while True:
        status = _status(pdserve)
        if len(status["workers"]) == count or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def test_status_json_and_table(basic_cluster, pdserve):
    with SyncClient(basic_cluster.address, timeout_s=120) as client:
        client.generate("Hello", SamplingParams(max_tokens=4, temperature=0))
    status = _status(pdserve)
    assert status["router"]["healthy"] and status["router"]["http_address"]
    assert sorted(w["role"] for w in status["workers"]) == ["decode", "prefill"]
    assert status["latency"]["finished"] >= 1 and status["latency"]["ttft_p90_s"] > 0
    assert status["latency"]["slo_ttft_s"] == 2.0
    table = pdserve("status")
    assert table.returncode == 0, table.stderr
    for text in ("serving", "TTFT p90", "KV blocks", *(w["worker_id"] for w in status["workers"])):
        assert text in table.stdout


def test_scale_up_then_drain_back_and_refusals(basic_cluster, pdserve):
    before = _status(pdserve)["workers"]
    prefill = next(w["worker_id"] for w in before if w["role"] == "prefill")
    up = pdserve("scale", "--decode", "2", "--json")
    assert up.returncode == 0, up.stderr
    started = json.loads(up.stdout)["started"]
    assert len(started) == 1 and json.loads(up.stdout)["stopped"] == []
    assert started[0] in {w["worker_id"] for w in _wait_for_workers(pdserve, 3)["workers"]}
    with SyncClient(basic_cluster.address, timeout_s=120) as client:  # still serves, on either decode worker
        for _ in range(4):
            assert client.generate("Count to three:", SamplingParams(max_tokens=4, temperature=0)).finish_reason
    down = pdserve("drain", started[0], "--json")
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout) == {"stopped": started[0], "started": None}
    after = _wait_for_workers(pdserve, 2)["workers"]
    assert {w["worker_id"] for w in after} == {w["worker_id"] for w in before}

    last = pdserve("drain", prefill)
    assert last.returncode == 2 and "last prefill worker" in last.stderr
    missing = pdserve("drain", "decode-99")
    assert missing.returncode == 2 and "no worker 'decode-99'" in missing.stderr
    wrong_role = pdserve("scale", "--colocated", "1")
    assert wrong_role.returncode == 2 and "colocated" in wrong_role.stderr
    basic_cluster.wait_until_idle()


def test_logs_of_the_cluster_and_of_a_worker(pdserve):
    cluster_log = pdserve("logs", "-n", "20")
    assert cluster_log.returncode == 0, cluster_log.stderr
    assert "pdserve" in cluster_log.stdout
    worker = _status(pdserve)["workers"][0]["worker_id"]
    worker_log = pdserve("logs", "--worker", worker, "-n", "5")
    assert worker_log.returncode == 0, worker_log.stderr
    assert "==> " in worker_log.stdout and "Worker" in worker_log.stdout
    unknown = pdserve("logs", "--worker", "nobody")
    assert unknown.returncode == 2 and "no worker 'nobody'" in unknown.stderr


def test_commands_without_a_cluster_say_so(pdserve, tmp_path):
    for command in (["status"], ["scale", "--decode", "2"], ["drain", "decode-0"]):
        done = pdserve(*command, state_dir=str(tmp_path))
        assert done.returncode == 1, (command, done.stderr)
        assert "no cluster is up" in done.stderr and "pdserve up" in done.stderr
