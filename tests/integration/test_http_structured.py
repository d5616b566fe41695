"""Structured output end to end on the shared basic cluster (SmolLM2, a prefill and a decode worker): the first
token is picked on the prefill worker under the grammar, the rest on the decode worker from the state rebuilt from
it. Through the official `openai` client (chat and completions, whole and streamed, OpenAI's and vLLM's names) and
gRPC, every answer parses and matches its spec, and the greedy ones equal the local engine's; an invalid spec is a
400 (INVALID_ARGUMENT) at once, naming the field, and the cluster serves on."""

import asyncio
import json
import re

import grpc
import jsonschema
import openai
import pytest

from pdserve.client import Client, build_request
from pdserve.engine import EngineConfig, Message, Prompt, SamplingParams
from pdserve.engine.structured_output import GuideKind, StructuredOutput

pytestmark = pytest.mark.model

MODEL = EngineConfig().model
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pet": {"enum": ["cat", "dog", "none"]}}}
ASK = "Describe a person as JSON with name, age and pet."
CODE = r"[0-9]{3}-[a-z]{2,6}"


@pytest.fixture(scope="module")
def cluster(basic_cluster):
    yield basic_cluster
    workers = basic_cluster.wait_until_idle()  # the fixture is shared: leave it as we found it
    assert all(w["used"] == 0 and w["running"] == 0 for w in workers.values()), workers


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    with openai.OpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def test_a_json_schema_answer_through_both_workers_equals_the_local_engine_and_matches(client, engine):
    messages = [{"role": "user", "content": ASK}]
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=96, temperature=0,
                                           response_format=response_format).choices[0]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=96, temperature=0,
                                            response_format=response_format, stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    text = whole.message.content
    assert "".join(c.delta.content or "" for c in chunks) == text
    assert whole.finish_reason == "stop" and [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    jsonschema.validate(json.loads(text), PERSON)
    mine = engine.generate([Prompt(messages=(Message("user", ASK),))], SamplingParams(
        max_tokens=96, temperature=0, structured_output=StructuredOutput(GuideKind.JSON, json.dumps(PERSON))))[0]
    assert text == mine.text


def test_sampled_choices_under_vllms_names_all_match(client):
    got = client.completions.create(model=MODEL, prompt="A product code: ", max_tokens=24, temperature=0.8, seed=5,
                                    n=3, extra_body={"structured_outputs": {"regex": CODE}})
    assert len(got.choices) == 3
    for choice in got.choices:
        assert re.fullmatch(CODE, choice.text) and choice.finish_reason == "stop", choice
    stream = client.completions.create(model=MODEL, prompt="Answer yes or no: is water wet?", max_tokens=8,
                                       stream=True, extra_body={"guided_choice": ["yes", "no"]})
    assert "".join(c.choices[0].text for c in stream if c.choices) in ("yes", "no")
    objects = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ASK}], n=2,
                                             max_tokens=128, temperature=0.7, seed=1,
                                             response_format={"type": "json_object"})
    for choice in objects.choices:
        assert isinstance(json.loads(choice.message.content), dict) and choice.finish_reason == "stop"


def test_over_grpc_a_grammar_is_followed(cluster):
    sampling = SamplingParams(max_tokens=16, temperature=0, structured_output=StructuredOutput(
        GuideKind.GRAMMAR, 'start: "SELECT " COL " FROM t"\nCOL: /[a-z]{1,8}/'))

    async def go():
        async with Client(cluster.address, timeout_s=120) as grpc_client:
            return await grpc_client.generate(Prompt(text="SQL: "), sampling)

    done = asyncio.run(go())
    assert re.fullmatch(r"SELECT [a-z]{1,8} FROM t", done.text) and done.finish_reason == "stop", done


def test_an_invalid_spec_is_refused_at_once_naming_it_and_the_cluster_serves_on(cluster, client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=4,
                                  extra_body={"structured_outputs": {"regex": "(unclosed"}})
    assert refused.value.param == "structured_outputs.regex" and "unclosed group" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "integer", "minimum": 3, "maximum": 1}}})
    assert refused.value.param == "response_format.json_schema.schema"
    bad = SamplingParams(max_tokens=4)
    request = build_request(Prompt(text="Hello"), bad)
    request.sampling.structured_output.grammar = "start: ???"

    async def go():
        from pdserve.proto import generation_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(cluster.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _ in pb_grpc.GenerationStub(channel).Generate(request, timeout=30):
                    pass
            return error.value

    error = asyncio.run(go())
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "structured_output.grammar" in error.details()
    ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 4
