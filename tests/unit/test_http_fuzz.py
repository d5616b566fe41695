"""Random OpenAI request bodies against the router's HTTP API (the real request builder and SmolLM2's tokenizer, a
fake orchestrator): every field at and beyond its bounds, of the wrong type, booleans for numbers, NaN and infinity,
lone surrogates in text. Every answer is a 200 or an OpenAI-shaped 4xx naming what was wrong, never a 500, and a
plain request is served after each."""

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.access import Access
from pdserve.engine import EngineConfig
from pdserve.router.http_server import OpenAIServer
from pdserve.router.request_builder import RequestBuilder
from tests.unit.test_http_server import FakeOrchestrator

MODEL = "fuzz-model"
EDGES = [0, 1, -1, 2**31 - 1, 2**31, -2**31 - 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64, 10**30]
JUNK = st.one_of(st.none(), st.booleans(), st.sampled_from(EDGES), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=5), st.just("\ud800"), st.lists(st.integers(-3, 3), max_size=2),
                 st.just({"a": 1}))
TEXT = st.one_of(st.text(max_size=30), st.just("\ud800"), st.just("a\udfffb"), st.just(""))


def small_or(values, junk=JUNK):
    """Mostly a servable value, often an edge or junk."""
    return st.one_of(values, st.sampled_from(EDGES), junk)


FIELDS = {
    "model": st.one_of(st.just(MODEL), TEXT),
    "max_tokens": small_or(st.integers(1, 4)),
    "temperature": small_or(st.floats(0, 2)),
    "top_p": small_or(st.floats(0.01, 1)),
    "top_k": small_or(st.integers(0, 50)),
    "n": small_or(st.integers(1, 2)),
    "seed": small_or(st.integers(0, 2**64 - 1)),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3), JUNK),
    "stop_token_ids": st.one_of(st.lists(st.sampled_from(EDGES + [5, 49151, 49152]), max_size=3), JUNK),
    "stream": st.one_of(st.booleans(), JUNK),
    "ignore_eos": st.one_of(st.booleans(), JUNK),
    "presence_penalty": small_or(st.just(0.0)),
    "logit_bias": st.one_of(st.none(), st.just({"5": 1.0}), JUNK),
    "stream_options": st.one_of(st.just({"include_usage": True}), JUNK),
}
PROMPTS = st.one_of(TEXT, st.lists(TEXT, max_size=3), st.lists(st.sampled_from(EDGES + [5, 49151, 49152]), max_size=4),
                    st.lists(st.lists(st.integers(-2, 60000), max_size=3), max_size=2), JUNK)
MESSAGES = st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                                     "content": st.one_of(TEXT, JUNK)}), max_size=3), JUNK)


@pytest.fixture(scope="module")
def client() -> TestClient:
    server = OpenAIServer(RequestBuilder(EngineConfig()), FakeOrchestrator(), MODEL, Access(), max_body_bytes=2**16)
    return TestClient(server.app(), raise_server_exceptions=False)


@st.composite
def requests(draw) -> tuple[str, dict]:
    chat = draw(st.booleans())
    body = draw(st.fixed_dictionaries({}, optional=FIELDS))
    body["messages" if chat else "prompt"] = draw(MESSAGES if chat else PROMPTS)
    return "/v1/chat/completions" if chat else "/v1/completions", body


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_every_body_gets_a_200_or_a_4xx_that_names_the_problem(client, request):
    path, body = request
    response = client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert response.status_code in (200, 400, 404, 413), (body, response.status_code, response.text[:300])
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"], error
    plain = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert plain.status_code == 200, plain.text
