"""`pdserve status`'s view of a worker's speculative decoding: the share of proposals accepted and the tokens a
speculative step emits, in the JSON and in the table ("-" where the worker does not speculate)."""

from rich.console import Console

from pdserve.cli.status import as_json, render
from pdserve.proto import generation_pb2 as pb


def status() -> pb.StatusResponse:
    return pb.StatusResponse(mode="disaggregated", router_address="127.0.0.1:1", workers=[
        pb.WorkerStatus(worker_id="decode-0", role="decode", state="ready", speculative_acceptance_rate=0.73,
                        speculative_tokens_per_step=3.14),
        pb.WorkerStatus(worker_id="prefill-0", role="prefill", state="ready")])


def test_speculation_shows_per_worker_in_json_and_table():
    health = pb.HealthResponse(healthy=True)
    workers = {w["worker_id"]: w for w in as_json(status(), health, [])["workers"]}
    assert workers["decode-0"]["speculative_acceptance_rate"] == 0.73
    assert workers["decode-0"]["speculative_tokens_per_step"] == 3.14
    assert workers["prefill-0"]["speculative_tokens_per_step"] == 0
    console = Console(width=200, record=True)
    for part in render(status(), health, []):
        console.print(part)
    lines = {line.split()[0]: line for line in console.export_text().splitlines() if line.split()}
    assert lines["decode-0"].rstrip().endswith("73% x3.1")
    assert lines["prefill-0"].rstrip().endswith("-")
