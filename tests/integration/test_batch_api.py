"""OpenAI's Files and Batch API on a live cluster (SmolLM2, a prefill and a decode worker, a real redis-server),
through the official `openai` client's `files` and `batches` calls unchanged: every line answered once, as the
local engine answers it; bad lines and bad batches refused naming what is wrong; a cancel keeps the answers so far;
the router SIGKILLed mid-batch (the control plane starts it again) loses no line and answers none twice."""

import json
import os
import signal
import time

import openai
import pytest

from pdserve.bench.local_cluster import start_cluster, stop_cluster
from pdserve.engine import EngineConfig, Prompt, SamplingParams

from .conftest import BASIC_CLUSTER

pytestmark = pytest.mark.model

MODEL = EngineConfig().model
WAIT_S = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = start_cluster(str(tmp_path_factory.mktemp("batch")), BASIC_CLUSTER)
    yield running
    stop_cluster(running)


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    with openai.OpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def prompt(i: int) -> str:
    return f"Item {i}: the number after {i} is"


def lines(count: int, max_tokens: int = 6, bad: tuple[int, ...] = ()) -> bytes:
    rows = []
    for i in range(count):
        body = {"model": MODEL, "prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0}
        if i in bad:
            body["max_tokens"] = 10**6  # beyond the context: a 400 naming max_tokens
        rows.append({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions", "body": body})
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"


def submit(client: openai.OpenAI, data: bytes):
    uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")


def wait_until(client: openai.OpenAI, batch_id: str, done, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} still {batch.status} ({batch.request_counts}) after {timeout_s} s")


def answers(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def expected_texts(engine, indexes) -> dict[str, str]:
    outputs = engine.generate([Prompt(text=prompt(i)) for i in indexes], SamplingParams(max_tokens=6, temperature=0))
    return {f"line-{i}": o.text for i, o in zip(indexes, outputs)}


def test_a_batch_is_answered_line_by_line_as_the_local_engine_answers(client, engine):
    batch = submit(client, lines(10, bad=(3,)))
    assert batch.status in ("validating", "in_progress") and batch.request_counts.total == 10
    done = wait_until(client, batch.id, lambda b: b.status == "completed")
    assert (done.request_counts.completed, done.request_counts.failed) == (9, 1)
    assert done.completed_at >= done.created_at and done.output_file_id and done.error_file_id
    expected = expected_texts(engine, [i for i in range(10) if i != 3])
    outputs = answers(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(expected)
    for line in outputs:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert line["response"]["body"]["choices"][0]["text"] == expected[line["custom_id"]]
    (error,) = answers(client, done.error_file_id)
    assert error["custom_id"] == "line-3" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "max_tokens"
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    assert any(b.id == batch.id for b in client.batches.list())


def test_bad_batches_and_bad_lines_are_refused_naming_them(client):
    uploaded = client.files.create(file=("requests.jsonl", lines(2)), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    assert refused.value.param == "endpoint"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    broken = lines(2) + b'{"custom_id": "line-0", "method": "POST", "url": "/v1/completions", "body": {}}\nnot json\n'
    failed = submit(client, broken)
    assert failed.status == "failed"
    assert [(e.line, e.param) for e in failed.errors.data] == [(3, "custom_id"), (4, None)]


def test_a_cancelled_batch_keeps_the_answers_it_has(client):
    batch = submit(client, lines(40, max_tokens=12))
    wait_until(client, batch.id, lambda b: b.request_counts.completed >= 1, timeout_s=120)
    assert client.batches.cancel(batch.id).status == "cancelling"
    done = wait_until(client, batch.id, lambda b: b.status == "cancelled")
    kept = answers(client, done.output_file_id)
    assert 1 <= len(kept) == done.request_counts.completed < 40
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)


def test_a_router_killed_mid_batch_loses_no_line_and_repeats_none(cluster, client, engine):
    count = 36
    batch = submit(client, lines(count))
    partial = wait_until(client, batch.id, lambda b: b.request_counts.completed >= 6, timeout_s=180)
    killed = cluster.state()["router_pids"][0]
    os.kill(killed, signal.SIGKILL)
    assert partial.status == "in_progress" and partial.request_counts.completed < count
    done = wait_until(client_after_restart(cluster), batch.id, lambda b: b.status == "completed")
    assert (done.request_counts.completed, done.request_counts.failed) == (count, 0)
    outputs = answers(client_after_restart(cluster), done.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"line-{i}" for i in range(count))  # once each
    expected = expected_texts(engine, range(count))
    assert {o["custom_id"]: o["response"]["body"]["choices"][0]["text"] for o in outputs} == expected
    assert killed not in cluster.state()["router_pids"]


def client_after_restart(cluster) -> openai.OpenAI:
    """A client that waits out the router's restart (the control plane starts it again on the same port)."""
    return openai.OpenAI(base_url=cluster.http_url, api_key="unused", max_retries=8, timeout=30)
