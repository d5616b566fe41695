"""The Batch API's runner (`router.batch_runner`) over a real redis-server on loopback, with a fake answer function:
a line whose answer raises gets an error line (it was dropped while the batch said completed), and a batch whose
input file was deleted before it ran fails naming `input_file_id` (it was claimed and crashed every second)."""

import asyncio
import json
import socket
import subprocess
import time
import uuid

import pytest
import redis

from pdserve.router import batch_runner
from pdserve.router.batch_api import BatchAPI, BatchCreate
from pdserve.router.batch_store import BatchStore

ENDPOINT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def redis_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield port
    server.terminate()
    server.wait(10)


def batch_of(store: BatchStore, custom_ids: list[str]) -> dict:
    rows = [{"custom_id": c, "method": "POST", "url": ENDPOINT,
             "body": {"messages": [{"role": "user", "content": c}], "max_tokens": 2}} for c in custom_ids]
    stored = store.put_file("".join(json.dumps(r) + "\n" for r in rows).encode(), "in.jsonl", "batch")
    return asyncio.run(BatchAPI(store).create_batch(BatchCreate(input_file_id=stored["id"], endpoint=ENDPOINT)))


def run_for(store: BatchStore, answer, seconds: float) -> None:
    async def go():
        task = asyncio.create_task(batch_runner.BatchRunner(store, answer, "router-a", 4).run())
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(go())


def custom_ids(path: str) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["custom_id"] for line in f]


def test_a_line_whose_answer_raises_gets_an_error_line_and_the_rest_go_on(redis_port, tmp_path, monkeypatch):
    monkeypatch.setattr(batch_runner, "POLL_S", 0.05)
    store = BatchStore(redis.Redis(port=redis_port), f"t-{uuid.uuid4().hex[:6]}", str(tmp_path))
    record = batch_of(store, ["a", "b", "c"])

    async def answer(endpoint, body, request_id):
        if body["messages"][0]["content"] == "b":
            raise ValueError("min_tokens: above the room left")
        return 200, {"choices": []}

    run_for(store, answer, 1.5)
    batch = store.batch(record["id"])
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert sorted(custom_ids(store.output_path(record["id"], "output"))) == ["a", "c"]
    assert custom_ids(store.output_path(record["id"], "error")) == ["b"]


def test_a_batch_whose_input_file_was_deleted_fails_naming_it(redis_port, tmp_path, monkeypatch):
    monkeypatch.setattr(batch_runner, "POLL_S", 0.05)
    store = BatchStore(redis.Redis(port=redis_port), f"t-{uuid.uuid4().hex[:6]}", str(tmp_path))
    record = batch_of(store, ["a"])
    store.delete_file(record["input_file_id"])

    async def answer(endpoint, body, request_id):
        return 200, {"choices": []}

    run_for(store, answer, 1.0)
    batch = store.batch(record["id"])
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["param"] == "input_file_id"


def test_ids_that_name_a_batchs_own_keys_are_no_batch_or_file(redis_port, tmp_path):
    """"<id>:cancel" and "<id>:owner" are keys of batch <id>; read as batch ids they were a 500."""
    from pdserve.router.batch_store import NotFound

    store = BatchStore(redis.Redis(port=redis_port), f"t-{uuid.uuid4().hex[:6]}", str(tmp_path))
    record = batch_of(store, ["a"])
    store.request_cancel(record["id"])
    assert store.claim(record["id"], "router-a", 10)
    for suffix in (":cancel", ":owner"):
        with pytest.raises(NotFound, match="no batch"):
            store.batch(record["id"] + suffix)
    with pytest.raises(NotFound, match="no file"):
        store.file(record["input_file_id"] + ":x")
