"""Logprobs over HTTP in OpenAI's shapes (`router.openai_logprobs`), whole and streamed, chat and completions, on the
fake orchestrator of `test_http_server` (no tokenizer there: a token shows as "token_id:<id>")."""

import pytest

from .test_http_server import CHAT, FakeOrchestrator, assert_error, client_for, events


def token(i: int) -> str:
    return f"token_id:{100 + i}"


def test_chat_logprobs_whole_and_streamed():
    client = client_for(FakeOrchestrator())
    body = {"messages": CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    content = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [token(i) for i in range(3)]
    assert [c["logprob"] for c in content] == [-0.25, -0.5, -0.75]
    assert content[0]["bytes"] == list(token(0).encode())
    assert [t["token"] for t in content[1]["top_logprobs"]] == [token(1), "token_id:7"]
    chunks = events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    streamed = [entry for c in chunks for choice in c["choices"] if choice.get("logprobs")
                for entry in choice["logprobs"]["content"]]
    assert streamed == content


def test_completion_logprobs_whole_and_streamed_with_text_offsets():
    client = client_for(FakeOrchestrator())
    body = {"prompt": "hi", "max_tokens": 3, "logprobs": 1}
    logprobs = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    width = len(token(0))
    assert logprobs == {"tokens": [token(i) for i in range(3)], "token_logprobs": [-0.25, -0.5, -0.75],
                        "top_logprobs": [{token(i): -(i + 1) / 4} for i in range(3)],
                        "text_offset": [0, width, 2 * width]}
    chunks = events(client.post("/v1/completions", json={**body, "stream": True}))
    offsets = [o for c in chunks for choice in c["choices"] if choice.get("logprobs")
               for o in choice["logprobs"]["text_offset"]]
    assert offsets == [0, width, 2 * width]


def test_without_logprobs_the_field_is_null():
    client = client_for(FakeOrchestrator())
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).json()["choices"][0][
        "logprobs"] is None


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
])
def test_bad_logprob_requests_are_refused_naming_the_field(path, body, param):
    orchestrator = FakeOrchestrator()
    assert_error(client_for(orchestrator).post(path, json=body), 400, param=param)
    assert orchestrator.received == []
