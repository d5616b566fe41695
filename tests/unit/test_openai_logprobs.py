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


def test_echo_puts_the_prompt_and_its_logprobs_first():
    """As lm-eval's loglikelihood reads it: the prompt's tokens (the fake's token ids are the text's bytes), the
    first with a null logprob, then the completion's."""
    client = client_for(FakeOrchestrator())
    body = {"prompt": "hi", "max_tokens": 2, "echo": True, "logprobs": 1}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == "hiw0 w1 "
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"] == [None, -1.0, -0.25, -0.5]
    assert logprobs["top_logprobs"][0] is None and len(logprobs["tokens"]) == 4
    chunks = events(client.post("/v1/completions", json={**body, "stream": True}))
    texts = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    streamed = [v for c in chunks if c.get("choices") and c["choices"][0].get("logprobs")
                for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert texts == "hiw0 w1 " and streamed == [None, -1.0, -0.25, -0.5]
    plain = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "echo": True}).json()
    assert plain["choices"][0]["text"] == "hiw0 w1 " and plain["choices"][0]["logprobs"] is None


def test_vllm_prompt_logprobs_come_with_the_choice():
    client = client_for(FakeOrchestrator())
    choice = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "prompt_logprobs": 1}).json()[
        "choices"][0]
    assert choice["prompt_logprobs"] == [None, {str(ord("i")): {"logprob": -1.0,
                                                                "decoded_token": f"token_id:{ord('i')}"}}]
