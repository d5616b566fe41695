"""The router's OpenAI-compatible HTTP API (`router.http_server`) on a fake request builder and a fake orchestrator
(no model, no Ray, no Redis), driven in process with FastAPI's TestClient: the bodies, stream chunks and errors in
OpenAI's shape, the status codes the module's docstring promises, the bearer token, /health and /metrics, and that a
client leaving a stream cancels every choice it started."""

import asyncio
import json
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from pdserve.access import Access
from pdserve.engine.logprobs import TokenLogprobs
from pdserve.engine.request import FinishReason
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto import generation_pb2 as pb
from pdserve.registry.entries import Role
from pdserve.router.choices import merged
from pdserve.router.errors import DuplicateRequest, Overloaded, Unavailable, WorkerError
from pdserve.router.http_server import OpenAIServer
from pdserve.router.http_serving import start_http
from pdserve.router.metrics import RouterMetrics
from pdserve.router.openai_protocol import MAX_CHOICES
from pdserve.router.orchestrator import Piece
from pdserve.router.request_builder import InvalidRequest, ValidRequest, sampling_params
from pdserve.router.timings import Timings

MODEL = "fake-model"
CONTEXT = 64
TOKEN = "s3cret-token"
ENDLESS = 2000
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def word(i: int) -> str:
    """The fake model's i-th output token's text."""
    return f"w{i} "


def fake_logprobs(i: int, count: int | None) -> tuple[TokenLogprobs, ...]:
    """The fake model's i-th token's logprobs (when asked): -(i + 1) / 4, then token 7 as the next most likely."""
    if count is None:
        return ()
    top = ((100 + i, -(i + 1) / 4), (7, -3.0))[:count]
    return (TokenLogprobs(100 + i, -(i + 1) / 4, top),)


def fake_prompt_logprobs(request: ValidRequest) -> tuple[TokenLogprobs | None, ...] | None:
    """The fake model's prompt logprobs (when asked): -1 for each prompt token after the first."""
    if request.sampling.prompt_logprobs is None:
        return None
    return (None, *(TokenLogprobs(t, -1.0, ((t, -1.0),)[:request.sampling.prompt_logprobs])
                    for t in request.token_ids[1:]))


def expected_text(max_tokens: int) -> str:
    return "".join(word(i) for i in range(max_tokens))


def fake_timings(request: ValidRequest) -> Timings:
    """The fake's prefix cache held all but the prompt's last token."""
    return Timings(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, cached_tokens=len(request.token_ids) - 1)


class FakeBuilder:
    """As `RequestBuilder`: the prompt's token ids are the bytes of its text (chat: "<role>content" per message), and
    prompt + max_tokens beyond CONTEXT is an InvalidRequest naming `sampling.max_tokens`."""

    context_length = CONTEXT
    vocab_size = 256

    def build(self, request: pb.GenerateRequest) -> ValidRequest:
        which = request.WhichOneof("prompt")
        if which == "token_ids":
            token_ids = tuple(request.token_ids.ids)
        elif which == "messages":
            token_ids = tuple(chat_bytes(request.messages.messages))
        else:
            token_ids = tuple(request.text.encode())
        if not token_ids:
            raise InvalidRequest("prompt: must not be empty")
        sampling = sampling_params(request.sampling)
        total = len(token_ids) + sampling.max_tokens
        if total > CONTEXT:
            raise InvalidRequest(f"sampling.max_tokens: prompt ({len(token_ids)} tokens) + max_tokens "
                                 f"({sampling.max_tokens}) = {total} exceeds the context length {CONTEXT}")
        return ValidRequest(request.request_id, token_ids, sampling, priority=request.priority)


def chat_bytes(messages) -> bytes:
    return "".join(f"<{m.role}>{m.content}" if hasattr(m, "role") else f"<{m['role']}>{m['content']}"
                   for m in messages).encode()


@dataclass
class FakeMembership:
    """What `admin.unhealthy_reason` reads: the ready workers by role, the prefill workers paired to a decode one."""

    ready_ids: dict[Role, list[str]] = field(default_factory=dict)
    pairs: dict[str, list[str]] = field(default_factory=dict)

    def ready(self, role: Role) -> list:
        return [SimpleNamespace(info=SimpleNamespace(worker_id=w)) for w in self.ready_ids.get(role, [])]

    def prefill_for(self, decode_id: str) -> list:
        return [SimpleNamespace(info=SimpleNamespace(worker_id=w)) for w in self.pairs.get(decode_id, [])]


PAIRED = FakeMembership({Role.PREFILL: ["prefill-0"], Role.DECODE: ["decode-0"]}, {"decode-0": ["prefill-0"]})


class FakeOrchestrator:
    """As `Orchestrator.generate`: one piece per token (the text `word(i)`), the last with finish_reason "length" and
    completion_tokens; `fail_before` / `fail_after` raise before the first piece / right after it (`fail_ids`: only
    for these request ids); `endless` does not finish before a client would give up (ENDLESS pieces, 5 ms apart: a
    test that fails does not hang). Every request it is given is kept, and how each one's generator
    ended (by request id)."""

    def __init__(self, fail_before: Exception | None = None, fail_after: Exception | None = None,
                 fail_ids: set[str] | None = None, endless: bool = False, membership: FakeMembership = PAIRED,
                 colocated: bool = False, kv_tokens: int | None = None) -> None:
        """`kv_tokens`: tokens a worker's KV cache holds (None: as if no worker were ready yet)."""
        self.placement = SimpleNamespace(output_room=lambda prompt: None if kv_tokens is None else kv_tokens - prompt)
        self.fail_before = fail_before
        self.fail_after = fail_after
        self.fail_ids = fail_ids
        self.endless = endless
        self.membership = membership
        self.colocated = colocated
        self.metrics = RouterMetrics()
        self.received: list[ValidRequest] = []
        self.running: set[str] = set()
        self.ended: dict[str, str] = {}
        """request id -> "finished", or the name of what ended it (CancelledError, GeneratorExit, ...)."""
        self.first_sent = threading.Event()
        self.all_ended = threading.Event()  # the TestClient runs the app on another thread

    async def generate(self, request: ValidRequest):
        if request.request_id in self.running:
            raise DuplicateRequest(f"request_id: {request.request_id!r} is already running")
        self.received.append(request)
        self.running.add(request.request_id)
        how = "finished"
        try:
            if self.fail_before is not None:
                raise self.fail_before
            i = 0
            count = ENDLESS if self.endless else request.sampling.max_tokens
            while i < count:
                last = i == count - 1
                yield Piece((100 + i,), word(i), FinishReason.LENGTH if last else None,
                            timings=fake_timings(request) if last else None, completion_tokens=i + 1 if last else 0,
                            logprobs=fake_logprobs(i, request.sampling.logprobs),
                            prompt_logprobs=fake_prompt_logprobs(request) if i == 0 else None)
                self.first_sent.set()
                if self.fail_after is not None and (self.fail_ids is None or request.request_id in self.fail_ids):
                    raise self.fail_after
                i += 1
                await asyncio.sleep(0.005 if self.endless else 0)
        except BaseException as e:
            how = type(e).__name__
            raise
        finally:
            self.running.discard(request.request_id)
            self.ended[request.request_id] = how
            if not self.running:
                self.all_ended.set()


def client_for(orchestrator: FakeOrchestrator, access: Access | None = None, **kwargs) -> TestClient:
    return TestClient(OpenAIServer(FakeBuilder(), orchestrator, MODEL, access or Access()).app(), **kwargs)


def events(response) -> list:
    """An SSE body as its events: every one a single `data: ` line followed by a blank line; the JSON ones parsed,
    the last one `[DONE]` (checked here)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    text = response.text
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    for block in blocks:
        assert block.startswith("data: ") and "\n" not in block, block
    payloads = [block.removeprefix("data: ") for block in blocks]
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def assert_error(response, status: int, kind: str | None = None, param: str | None = None,
                 code: str | None = None) -> str:
    """The response is OpenAI's error shape with this status; returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    if kind is not None:
        assert error["type"] == kind, error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error["message"]


def metric(client: TestClient, outcome: str) -> float:
    line = f'pdserve_requests_total{{outcome="{outcome}"}} '
    return float(next(row for row in client.get("/metrics").text.splitlines() if row.startswith(line)).split()[-1])


# ---- bodies ----------------------------------------------------------------------------------------------------------
def test_completion_body_has_openai_shape_and_echoes_the_request_id():
    orchestrator = FakeOrchestrator()
    before = int(time.time())
    response = client_for(orchestrator).post("/v1/completions", json={"model": MODEL, "prompt": "hello",
                                                                     "max_tokens": 3, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("cmpl-") and response.headers["x-request-id"] == body["id"]
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert before <= body["created"] <= time.time() + 1
    assert body["choices"] == [{"index": 0, "text": "w0 w1 w2 ", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 4}}
    [sent] = orchestrator.received
    assert sent.request_id == body["id"] and sent.token_ids == tuple(b"hello")
    assert sent.sampling.max_tokens == 3 and sent.sampling.temperature == 0


def test_chat_body_has_openai_shape():
    orchestrator = FakeOrchestrator()
    response = client_for(orchestrator).post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and response.headers["x-request-id"] == body["id"]
    assert body["object"] == "chat.completion" and body["model"] == MODEL and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": expected_text(4)},
                                "logprobs": None, "finish_reason": "length"}]
    prompt_tokens = len(chat_bytes(CHAT))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 4, "total_tokens": prompt_tokens + 4,
                             "prompt_tokens_details": {"cached_tokens": prompt_tokens - 1}}
    assert orchestrator.received[0].token_ids == tuple(chat_bytes(CHAT))


def test_models_lists_the_served_model():
    body = client_for(FakeOrchestrator()).get("/v1/models").json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == MODEL and model["object"] == "model" and model["max_model_len"] == CONTEXT


# ---- streams ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("include_usage", [False, True])
def test_completion_stream_deltas_add_up_to_the_whole_body(include_usage):
    client = client_for(FakeOrchestrator())
    request = {"prompt": "hello", "max_tokens": 5}
    whole = client.post("/v1/completions", json=request).json()
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = events(client.post("/v1/completions", json={**request, "stream": True, **extra}))
    usage = [c for c in chunks if "usage" in c]
    text_chunks = [c for c in chunks if "usage" not in c]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    assert all(len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 for c in text_chunks)
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == whole["choices"][0]["text"] == expected_text(5)
    assert [c["choices"][0]["finish_reason"] for c in text_chunks] == [None] * 4 + ["length"]
    if include_usage:
        assert chunks[-1] is usage[0] and len(usage) == 1
        assert usage[0]["choices"] == [] and usage[0]["usage"] == whole["usage"]
    else:
        assert usage == []


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_starts_with_the_role_and_ends_with_the_finish(include_usage):
    client = client_for(FakeOrchestrator())
    request = {"messages": CHAT, "max_tokens": 3}
    whole = client.post("/v1/chat/completions", json=request).json()
    chunks = events(client.post("/v1/chat/completions", json={**request, "stream": True,
                                                                "stream_options": {"include_usage": include_usage}}))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
        chunks = chunks[:-1]
    assert not any("usage" in c for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert "".join(d["content"] for d in deltas) == whole["choices"][0]["message"]["content"] == expected_text(3)
    assert all(set(d) == {"content"} for d in deltas)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]


# ---- choices: n and lists of prompts ---------------------------------------------------------------------------------
def test_two_prompts_times_n_2_are_four_requests_numbered_prompt_major():
    orchestrator = FakeOrchestrator()
    response = client_for(orchestrator).post("/v1/completions", json={"prompt": ["ab", "cde"], "n": 2,
                                                                     "max_tokens": 2},
                                             headers={"X-Request-Id": "my-id"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "my-id" and response.headers["x-request-id"] == "my-id"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == expected_text(2) and c["finish_reason"] == "length" for c in body["choices"])
    sent = {r.request_id: r.token_ids for r in orchestrator.received}
    assert sent == {"my-id-0": tuple(b"ab"), "my-id-1": tuple(b"ab"), "my-id-2": tuple(b"cde"),
                    "my-id-3": tuple(b"cde")}
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13,  # each prompt once
                             "prompt_tokens_details": {"cached_tokens": 1 + 2}}


def test_a_list_of_prompts_counts_each_prompt_once_in_usage():
    body = client_for(FakeOrchestrator()).post("/v1/completions", json={"prompt": ["ab", "cde"],
                                                                        "max_tokens": 2}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9,
                             "prompt_tokens_details": {"cached_tokens": 1 + 2}}


def test_token_id_prompts_reach_the_builder_as_token_ids():
    orchestrator = FakeOrchestrator()
    client = client_for(orchestrator)
    assert client.post("/v1/completions", json={"prompt": [7, 8, 9], "max_tokens": 1}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": [[1, 2], [3]], "max_tokens": 1}).status_code == 200
    assert [r.token_ids for r in orchestrator.received] == [(7, 8, 9), (1, 2), (3,)]


def test_chat_n_2_streams_each_choice_with_its_own_role_and_finish():
    orchestrator = FakeOrchestrator()
    response = client_for(orchestrator).post("/v1/chat/completions", json={
        "messages": CHAT, "n": 2, "max_tokens": 3, "stream": True}, headers={"X-Request-Id": "chat-7"})
    chunks = events(response)
    assert response.headers["x-request-id"] == "chat-7" and {c["id"] for c in chunks} == {"chat-7"}
    assert [c["choices"][0] for c in chunks[:2]] == [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in (0, 1)]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[2:] if c["choices"][0]["index"] == index]
        assert "".join(c["delta"].get("content", "") for c in mine) == expected_text(3)
        assert [c["finish_reason"] for c in mine] == [None] * 3 + ["length"]
    assert sorted(r.request_id for r in orchestrator.received) == ["chat-7-0", "chat-7-1"]


def test_chat_without_max_tokens_runs_to_the_end_of_the_context():
    orchestrator = FakeOrchestrator()
    client = client_for(orchestrator)
    prompt_tokens = len(chat_bytes(CHAT))
    body = client.post("/v1/chat/completions", json={"messages": CHAT}).json()
    assert orchestrator.received[-1].sampling.max_tokens == CONTEXT - prompt_tokens
    assert body["usage"]["completion_tokens"] == CONTEXT - prompt_tokens
    client.post("/v1/chat/completions", json={"messages": CHAT, "max_completion_tokens": 5})
    assert orchestrator.received[-1].sampling.max_tokens == 5
    client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 7})
    assert orchestrator.received[-1].sampling.max_tokens == 7
    client.post("/v1/completions", json={"prompt": "hello"})  # completions keep the builder's default
    assert orchestrator.received[-1].sampling.max_tokens == 16


def test_chat_without_max_tokens_whose_min_tokens_cannot_fit_is_a_400_naming_min_tokens():
    orchestrator = FakeOrchestrator(kv_tokens=CONTEXT - 10)
    fits_the_context_not_the_cache = CONTEXT - len(chat_bytes(CHAT)) - 2
    response = client_for(orchestrator).post("/v1/chat/completions",
                                             json={"messages": CHAT, "min_tokens": fits_the_context_not_the_cache})
    assert response.status_code == 400 and response.json()["error"]["param"] == "min_tokens"
    assert "more than the" in response.json()["error"]["message"] and orchestrator.received == []


def test_chat_without_max_tokens_stops_where_a_workers_kv_cache_ends_if_before_the_context():
    """A worker whose KV cache holds fewer tokens than the context: prompt + the context's room would not fit in it,
    and the request would be refused naming a max_tokens the client never sent."""
    orchestrator = FakeOrchestrator(kv_tokens=CONTEXT - 10)
    client = client_for(orchestrator)
    body = client.post("/v1/chat/completions", json={"messages": CHAT}).json()
    assert orchestrator.received[-1].sampling.max_tokens == CONTEXT - 10 - len(chat_bytes(CHAT))
    assert body["usage"]["completion_tokens"] == CONTEXT - 10 - len(chat_bytes(CHAT))


# ---- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, where", [
    ("/v1/chat/completions", {"messages": [{"role": 7, "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "many"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": {"text": "hi"}}, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
])
def test_a_wrong_type_is_a_400_naming_the_field(path, body, where):
    orchestrator = FakeOrchestrator()
    message = assert_error(client_for(orchestrator).post(path, json=body), 400, "invalid_request_error", where)
    assert message.startswith(f"{where}: ")
    assert orchestrator.received == []


HOSTILE = [  # each was a plain-text 500 (a number beyond its protobuf field, a string protobuf cannot encode)
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**10}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**10, "stream": True}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 2**32}, "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**31}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [2**31]}, "stop_token_ids[0]"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids[0]"),
    ("/v1/completions", {"prompt": [5, 2**31]}, "prompt"),
    ("/v1/completions", {"prompt": [[5], [-3]]}, "prompt"),
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\udfff"]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[0].content"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": True}, "n"),
    ("/v1/completions", {"prompt": "hi", "top_k": False}, "top_k"),
    ("/v1/completions", {"prompt": [True, 5]}, "prompt"),
]


@pytest.mark.parametrize("path, body, where", HOSTILE)
def test_a_number_beyond_its_range_or_unencodable_text_is_a_400_naming_the_field(path, body, where):
    orchestrator = FakeOrchestrator()
    client = client_for(orchestrator)
    raw = json.dumps(body)  # ensure_ascii: a lone surrogate travels as a JSON escape
    response = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    message = assert_error(response, 400, "invalid_request_error", None)
    assert message.startswith(f"{where}") and response.json()["error"]["param"].startswith(where), message
    assert orchestrator.received == []
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_body_that_is_not_json_is_a_400():
    response = client_for(FakeOrchestrator()).post("/v1/completions", content=b'{"prompt": ',
                                                   headers={"content-type": "application/json"})
    assert assert_error(response, 400, "invalid_request_error").startswith("body: ")


@pytest.mark.parametrize("path, extra, name", [
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
def test_unsupported_features_are_refused_naming_them(path, extra, name):
    orchestrator = FakeOrchestrator()
    prompt = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    response = client_for(orchestrator).post(path, json={**prompt, **extra})
    message = assert_error(response, 400, "invalid_request_error", name, "unsupported_parameter")
    assert message.startswith(f"{name}: ")
    assert orchestrator.received == []


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "n": MAX_CHOICES + 1}),
    ("/v1/completions", {"prompt": ["a", "b"], "n": MAX_CHOICES // 2 + 1}),
    ("/v1/chat/completions", {"messages": CHAT, "n": MAX_CHOICES + 1}),
])
def test_more_choices_than_the_cap_are_refused(path, body):
    orchestrator = FakeOrchestrator()
    message = assert_error(client_for(orchestrator).post(path, json=body), 400, "invalid_request_error", "n")
    assert message.startswith("n: ") and str(MAX_CHOICES) in message
    assert orchestrator.received == []


def test_an_invalid_request_from_the_builder_is_a_400_without_the_sampling_prefix():
    orchestrator = FakeOrchestrator()
    client = client_for(orchestrator)
    response = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": CONTEXT})
    message = assert_error(response, 400, "invalid_request_error", "max_tokens")
    assert message.startswith("max_tokens: prompt (5 tokens) + max_tokens (64)") and "sampling." not in message
    assert orchestrator.received == []
    assert metric(client, "invalid") == 1
    assert_error(client.post("/v1/completions", json={"prompt": ""}), 400, param="prompt")


def test_an_unknown_model_is_a_404():
    orchestrator = FakeOrchestrator()
    response = client_for(orchestrator).post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert "gpt-9" in assert_error(response, 404, param="model", code="model_not_found")
    assert orchestrator.received == []


def test_unknown_paths_and_methods_answer_in_openai_shape():
    client = client_for(FakeOrchestrator())
    assert_error(client.get("/v1/nothing"), 404, "not_found_error")
    assert_error(client.get("/v1/completions"), 405)


def test_an_overlong_request_id_header_is_a_400():
    response = client_for(FakeOrchestrator()).post("/v1/completions", json={"prompt": "hi"},
                                                   headers={"X-Request-Id": "x" * 300})
    assert_error(response, 400, param="x-request-id")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("error, status, kind, code, outcome", [
    (Overloaded("overloaded: 9 requests are already waiting"), 429, "overloaded_error", "queue_full", "overloaded"),
    (DuplicateRequest("request_id: 'x' is already running"), 409, "invalid_request_error", "duplicate_request_id",
     "duplicate"),
    (Unavailable("no ready worker for this request"), 503, "service_unavailable_error", None, None),
    (WorkerError("worker decode-0: RuntimeError: boom"), 500, "internal_error", None, None),
    (InvalidRequest("sampling.max_tokens: needs more KV blocks than a worker has"), 400, "invalid_request_error",
     None, None),
])
def test_an_orchestrator_error_before_the_first_token_is_an_http_status(stream, error, status, kind, code, outcome):
    orchestrator = FakeOrchestrator(fail_before=error)
    client = client_for(orchestrator)
    response = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, "stream": stream})
    message = assert_error(response, status, kind, code=code)
    assert message == str(error).removeprefix("sampling.")
    if outcome is not None:  # refused before the orchestrator counts the request: the server counts it
        assert metric(client, outcome) == 1


@pytest.mark.parametrize("error, kind", [
    (Unavailable("worker decode-0 failed: RayActorError"), "service_unavailable_error"),
    (WorkerError("worker decode-0: RuntimeError: boom"), "internal_error"),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_error_after_the_first_token_is_an_error_event_then_done(error, kind, path):
    orchestrator = FakeOrchestrator(fail_after=error)
    prompt = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    chunks = events(client_for(orchestrator).post(path, json={**prompt, "max_tokens": 4, "stream": True,
                                                              "stream_options": {"include_usage": True}}))
    assert chunks[-1] == {"error": {"message": str(error), "type": kind, "param": None, "code": None}}
    assert all("error" not in c for c in chunks[:-1])
    texts = [c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") for c in chunks[:-1]]
    assert "w0 " in texts


@pytest.mark.parametrize("error, status", [(Unavailable("worker decode-0 failed"), 503),
                                           (WorkerError("worker decode-0: RuntimeError: boom"), 500)])
def test_an_error_after_the_first_token_of_a_whole_body_is_an_openai_error(error, status):
    client = client_for(FakeOrchestrator(fail_after=error), raise_server_exceptions=False)
    assert_error(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4}), status)


def test_a_request_id_already_running_is_a_409():
    orchestrator = FakeOrchestrator(endless=True)
    client = client_for(orchestrator)
    body = {"prompt": "hi", "stream": True}
    with client.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": "same"}) as first:
        assert first.status_code == 200
        lines = first.iter_lines()  # kept: dropping the iterator would close the response
        assert next(lines).startswith("data: ")
        second = client.post("/v1/completions", json=body, headers={"X-Request-Id": "same"})
        assert "'same' is already running" in assert_error(second, 409, param="x-request-id")
    assert orchestrator.all_ended.wait(5)
    assert orchestrator.ended == {"same": "CancelledError"}
    orchestrator.endless = False  # the id is free again once its request ended
    assert client.post("/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Id": "same"}).status_code == 200


# ---- access ----------------------------------------------------------------------------------------------------------
def test_a_bearer_token_guards_every_v1_call_but_not_health_and_metrics():
    orchestrator = FakeOrchestrator()
    client = client_for(orchestrator, Access(token=TOKEN))
    right = {"Authorization": f"Bearer {TOKEN}"}
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})):
        message = assert_error(client.post(path, json=body), 401, "authentication_error", code="invalid_api_key")
        assert message.startswith("missing bearer token")
        wrong = client.post(path, json=body, headers={"Authorization": "Bearer guess"})
        assert assert_error(wrong, 401, "authentication_error").startswith("wrong bearer token")
        assert client.post(path, json=body, headers=right).status_code == 200
    assert len(orchestrator.received) == 2  # the refused ones never reached the orchestrator
    assert_error(client.get("/v1/models"), 401, "authentication_error")
    assert client.get("/v1/models", headers=right).json()["data"][0]["id"] == MODEL
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200
    bad_body = client.post("/v1/completions", json={"prompt": 5})  # the token is checked before the body
    assert assert_error(bad_body, 401, "authentication_error").startswith("missing bearer token")


# ---- health and metrics ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("membership, colocated, detail", [
    (PAIRED, False, None),
    (FakeMembership({Role.PREFILL: ["prefill-0"], Role.DECODE: ["decode-0"]}), False,
     "no paired prefill and decode workers"),
    (FakeMembership(), False, "no paired prefill and decode workers"),
    (FakeMembership({Role.BOTH: ["worker-0"]}), True, None),
    (FakeMembership(), True, "no colocated worker is ready"),
])
def test_health_is_200_when_the_cluster_can_serve_and_503_with_the_reason(membership, colocated, detail):
    response = client_for(FakeOrchestrator(membership=membership, colocated=colocated)).get("/health")
    if detail is None:
        assert response.status_code == 200 and response.json() == {"status": "ok"}
    else:
        assert response.status_code == 503
        assert response.json()["status"] == "unavailable" and detail in response.json()["detail"]


def test_metrics_are_prometheus_text_and_count_refusals():
    client = client_for(FakeOrchestrator(fail_before=Overloaded("overloaded")))
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "# TYPE pdserve_requests_total counter" in response.text
    assert 'pdserve_requests_total{outcome="overloaded"} 0.0' in response.text
    assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 429
    assert 'pdserve_requests_total{outcome="overloaded"} 1.0' in client.get("/metrics").text


# ---- cancellation ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
def test_leaving_a_stream_early_cancels_every_choice(n):
    orchestrator = FakeOrchestrator(endless=True)
    client = client_for(orchestrator)
    with client.stream("POST", "/v1/completions", json={"prompt": "hi", "n": n, "stream": True},
                       headers={"X-Request-Id": "gone"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: {") and next(lines) == "" and next(lines).startswith("data: {")
    assert orchestrator.all_ended.wait(5), orchestrator.ended
    ids = ["gone"] if n == 1 else [f"gone-{i}" for i in range(n)]
    assert orchestrator.ended == {i: "CancelledError" for i in ids}


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_from_the_real_server_cancels_its_request(stream):
    """Over uvicorn on 127.0.0.1, as the router serves it (not the TestClient's model of a disconnect)."""
    orchestrator = FakeOrchestrator(endless=True)

    async def go() -> list[str]:
        app = OpenAIServer(FakeBuilder(), orchestrator, MODEL, Access()).app()
        http = await start_http(app, "127.0.0.1", 0, None)
        loop = asyncio.get_running_loop()
        try:
            host, port = http.address.rsplit(":", 1)
            _, writer = await asyncio.open_connection(host, int(port))
            body = json.dumps({"prompt": "hi", "stream": stream}).encode()
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            deadline = loop.time() + 5
            while not orchestrator.first_sent.is_set() and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert orchestrator.first_sent.is_set()
            writer.close()
            deadline = loop.time() + 1
            while not orchestrator.all_ended.is_set() and loop.time() < deadline:
                await asyncio.sleep(0.02)
            return list(orchestrator.ended.values())
        finally:
            await http.stop()

    assert asyncio.run(go()) == ["CancelledError"]


def make_requests(count: int) -> list[ValidRequest]:
    return [ValidRequest(f"r-{i}", (1, 2), SamplingParams(max_tokens=4)) for i in range(count)]


def test_closing_the_merged_stream_cancels_every_choice():
    orchestrator = FakeOrchestrator(endless=True)

    async def go():
        stream = merged(orchestrator, make_requests(3))
        seen = {(await anext(stream)).index for _ in range(6)}
        await stream.aclose()
        return seen

    assert asyncio.run(go()) == {0, 1, 2}
    assert orchestrator.ended == {f"r-{i}": "CancelledError" for i in range(3)}


def test_an_error_in_one_choice_ends_the_merged_stream_and_cancels_the_others():
    orchestrator = FakeOrchestrator(fail_after=WorkerError("worker decode-0: boom"), fail_ids={"r-1"}, endless=True)

    async def go():
        with pytest.raises(WorkerError, match="boom"):
            async for _ in merged(orchestrator, make_requests(3)):
                pass

    asyncio.run(go())
    assert orchestrator.ended == {"r-0": "CancelledError", "r-1": "WorkerError", "r-2": "CancelledError"}


def test_choices_that_finish_end_the_merged_stream_in_order_per_choice():
    orchestrator = FakeOrchestrator()

    async def go():
        return [item async for item in merged(orchestrator, make_requests(2))]

    items = asyncio.run(go())
    for index in (0, 1):
        mine = [item.piece for item in items if item.index == index]
        assert "".join(p.text for p in mine) == expected_text(4)
        assert [p.finish_reason for p in mine] == [None, None, None, FinishReason.LENGTH]
    assert orchestrator.ended == {"r-0": "finished", "r-1": "finished"}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_files_make_the_http_port_speak_https_only(tmp_path):
    """As router.tls_cert_file/tls_key_file do for gRPC: the HTTP API on uvicorn answers HTTPS, not plain HTTP."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    trusted = ssl.create_default_context(cafile=str(cert))

    async def go() -> tuple[int, str]:
        app = OpenAIServer(FakeBuilder(), FakeOrchestrator(), MODEL, Access()).app()
        http = await start_http(app, "127.0.0.1", 0, (str(cert), str(key)))
        try:
            def fetch() -> tuple[int, str]:
                over_tls = urllib.request.urlopen(f"https://{http.address}/health", context=trusted, timeout=5)
                try:
                    urllib.request.urlopen(f"http://{http.address}/health", timeout=5)
                    plain = "answered"
                except (urllib.error.URLError, ConnectionError) as e:
                    plain = type(e).__name__
                return over_tls.status, plain
            return await asyncio.to_thread(fetch)
        finally:
            await http.stop()

    status, plain = asyncio.run(go())
    assert status == 200
    assert plain != "answered"


def test_a_body_over_the_limit_is_a_413_before_it_is_read_and_the_next_request_is_served():
    orchestrator = FakeOrchestrator()
    client = TestClient(OpenAIServer(FakeBuilder(), orchestrator, MODEL, Access(), max_body_bytes=4096).app())
    big = {"prompt": "x" * 5000, "max_tokens": 2}
    announced = client.post("/v1/completions", json=big)  # Content-Length says 5 kB
    assert assert_error(announced, 413, "invalid_request_error", "body").startswith("body: larger than 4096 bytes")

    def chunks():  # no Content-Length: read until it passes the limit
        for _ in range(10):
            yield b"x" * 1000

    chunked = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and orchestrator.received == []
    within = client.post("/v1/completions", json={"prompt": "x" * 3000, "max_tokens": 2})
    assert within.status_code == 400 and "context length" in within.json()["error"]["message"]  # read and checked
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_first_piece_without_text_still_streams_the_prompt_logprobs():
    """Text held back (half a character, a possible stop string) left the first piece with nothing to say, and its
    prompt logprobs were dropped from the stream while the whole answer had them."""

    class HalfCharacterFirst(FakeOrchestrator):
        async def generate(self, request):
            yield Piece((200,), "", None, prompt_logprobs=fake_prompt_logprobs(request))
            yield Piece((201,), "é", FinishReason.LENGTH, timings=fake_timings(request), completion_tokens=2)

    client = client_for(HalfCharacterFirst())
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2, "prompt_logprobs": 1}),
                       ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "prompt_logprobs": 1})):
        whole = client.post(path, json=body).json()["choices"][0]["prompt_logprobs"]
        streamed = [c["choices"][0]["prompt_logprobs"] for c in events(client.post(path, json={**body, "stream": True}))
                    if c["choices"] and "prompt_logprobs" in c["choices"][0]]
        assert whole is not None and streamed == [whole], path
