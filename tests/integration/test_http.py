"""The router's OpenAI-compatible HTTP API end to end on the shared basic cluster (SmolLM2, a prefill and a decode
worker, 127.0.0.1): the official `openai` client against it, greedy outputs equal to the local engine's (whose tokens
equal transformers'), errors as the client's exceptions, the SSE stream read by a plain HTTP client, and a stream
left early freeing its KV blocks on both workers."""

import asyncio
import http.client
import json
import time
import urllib.parse
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.client import Client
from pdserve.engine import EngineConfig, Message, Prompt, SamplingParams

pytestmark = pytest.mark.model

MODEL = EngineConfig().model
"""The served name: the basic cluster sets no `router.served_model_name`."""
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def cluster(basic_cluster):
    yield basic_cluster
    workers = basic_cluster.wait_until_idle()  # the fixture is shared: leave it as we found it
    assert all(w["used"] == 0 and w["running"] == 0 for w in workers.values()), workers


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    with openai.OpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def local(engine, prompt: Prompt, max_tokens: int):
    return engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0))[0]


def host_port(cluster) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(cluster.http_url)
    assert parsed.hostname == "127.0.0.1"
    return parsed.hostname, parsed.port


def post_stream(cluster, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """POST /v1/completions with `stream: true` over a plain HTTP connection; the response is read line by line."""
    connection = http.client.HTTPConnection(*host_port(cluster), timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    assert response.getheader("content-type").startswith("text/event-stream")
    return connection, response


def next_event(response: http.client.HTTPResponse) -> str:
    """The next SSE event's data: one `data: ...` line, then a blank line."""
    line = response.readline().decode()
    assert line.startswith("data: ") and line.endswith("\n"), repr(line)
    assert response.readline() in (b"\n", b"\r\n")
    return line.removeprefix("data: ").rstrip("\r\n")


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


# The HTTP API returns text, not token ids, and tokenizing that text again need not give back the generated ids. So
# the cluster's text, token count and finish reason must equal the local engine's for the same prompt: the same model
# and the same incremental detokenizer, so a different token shows as different text (or a different count). The
# local engine's token ids equal transformers' on these prompts in test_smollm2_oracle.py and test_cluster.py; the
# oracle is not loaded here, as loading it takes about a minute on a small CPU machine.
def test_greedy_completions_match_the_local_engine(client, engine):
    texts = ["The quick brown fox", "def fibonacci(n):"]
    token_ids = [504, 2365, 6354]
    by_text = client.completions.create(model=MODEL, prompt=texts, max_tokens=16, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=token_ids, max_tokens=16, temperature=0)
    choices = sorted(by_text.choices, key=lambda c: c.index) + by_ids.choices
    prompts = [Prompt(text=t) for t in texts] + [Prompt(token_ids=tuple(token_ids))]
    assert [c.index for c in choices] == [0, 1, 0]
    mine = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    for prompt, choice, output in zip(prompts, choices, mine):
        assert choice.text == output.text, prompt
        assert choice.finish_reason == output.finish_reason.value
    assert by_text.usage.prompt_tokens == sum(len(m.prompt_token_ids) for m in mine[:2])
    assert by_text.usage.completion_tokens == sum(len(m.token_ids) for m in mine[:2])
    assert by_ids.usage.prompt_tokens == 3 and by_ids.usage.completion_tokens == len(mine[2].token_ids)
    assert by_text.usage.total_tokens == by_text.usage.prompt_tokens + by_text.usage.completion_tokens


def test_sampling_controls_through_both_workers_match_the_local_engine(client, engine):
    """Penalties, min_tokens and logit_bias through the official client (`extra_body` for vLLM's names): the first
    token is picked on the prefill worker, the rest on the decode worker, and the text equals the local engine's with
    the same parameters; each control changes the greedy output, as its definition says it should on this case."""
    prompt = "List the numbers: one one one one one one one"
    plain = SamplingParams(max_tokens=12, temperature=0)
    cases = [
        ({"frequency_penalty": 1.5, "presence_penalty": 1.0}, {}),
        ({}, {"repetition_penalty": 1.8, "min_tokens": 4}),
        ({"logit_bias": {"28": 100}}, {}),
    ]
    baseline = engine.generate([Prompt(text=prompt)], plain)[0]
    for openai_fields, vllm_fields in cases:
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body=vllm_fields, **openai_fields).choices[0]
        bias = tuple((int(t), float(b)) for t, b in openai_fields.pop("logit_bias", {}).items())
        mine = engine.generate([Prompt(text=prompt)], SamplingParams(max_tokens=12, temperature=0, logit_bias=bias,
                                                                     **openai_fields, **vllm_fields))[0]
        assert got.text == mine.text and got.finish_reason == mine.finish_reason.value
        assert mine.token_ids != baseline.token_ids, (openai_fields, vllm_fields)
    assert set(mine.token_ids) == {28}  # the last case: the bias wins every step


def test_logprobs_through_the_cluster_equal_transformers_log_softmax(client, reference):
    """The first token's logprobs come from the prefill worker, the rest from the decode worker: each equals
    transformers' log-softmax at its position within 1e-4 (fp32), and so do the alternatives; with `echo`, the
    prompt tokens' logprobs (computed on the prefill worker) give the prompt's log-likelihood as transformers does."""
    import torch

    prompt = [504, 2365, 6354, 11113, 30]
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
                                    extra_body={"return_token_ids": True}).choices[0]
    generated = got.model_extra["token_ids"]
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1:-1]  # [8, V]
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert len(got.logprobs.token_logprobs) == len(generated) == 8
    for step, (token, logprob, top) in enumerate(zip(generated, got.logprobs.token_logprobs,
                                                     got.logprobs.top_logprobs)):
        assert logprob == pytest.approx(expected[step, token].item(), abs=1e-4)
        best = expected[step].topk(2)
        assert sorted(top.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1,
                                       echo=True).choices[0].logprobs
    with torch.no_grad():
        whole = torch.log_softmax(reference(torch.tensor([prompt])).logits[0].float(), dim=-1)  # [P, V]
    assert echoed.token_logprobs[0] is None and len(echoed.token_logprobs) == len(prompt) + 1
    assert echoed.token_logprobs[1:len(prompt)] == pytest.approx(
        [whole[p - 1, prompt[p]].item() for p in range(1, len(prompt))], abs=1e-4)  # the prompt's log-likelihood
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=1)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(c.logprob <= 0 for c in content)
    assert all(len(c.top_logprobs) == 1 and c.top_logprobs[0].logprob == c.logprob for c in content)  # greedy


def test_greedy_chat_stream_adds_up_to_the_whole_answer_with_its_usage(client, engine):
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert usage_chunk.choices == [] and all(c.usage is None for c in text_chunks)
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in text_chunks if c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]
    mine = local(engine, Prompt(messages=(Message("user", QUESTION),)), 24)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == mine.text
    assert whole.choices[0].finish_reason == mine.finish_reason.value
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens == len(mine.prompt_token_ids)
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens == len(mine.token_ids)
    assert usage_chunk.usage.total_tokens == len(mine.prompt_token_ids) + len(mine.token_ids)


def test_max_tokens_beyond_the_context_is_a_bad_request_and_the_cluster_still_serves(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=1_000_000, temperature=0)
    assert refused.value.status_code == 400 and refused.value.param == "max_tokens"
    assert "max_tokens" in refused.value.message and "sampling." not in refused.value.message
    ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 4 and ok.choices[0].finish_reason == "length"


def test_a_plain_http_client_reads_the_stream_to_done(cluster, client):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    connection, response = post_stream(cluster, body)
    try:
        events = []
        for _ in range(100):  # 12 tokens: at most 13 events
            events.append(next_event(response))
            if events[-1] == "[DONE]":
                break
        assert events[-1] == "[DONE]" and response.read() == b""
    finally:
        connection.close()
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] in ("stop", "length")
    whole = client.completions.create(**body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text


def test_a_stream_closed_early_frees_its_kv_blocks(cluster):
    cancelled = 'pdserve_requests_total{outcome="cancelled"}'
    before = cluster.router_metric(cancelled)
    connection, response = post_stream(cluster, {"model": MODEL, "prompt": "Tell me a long story.",
                                                 "max_tokens": 1000, "temperature": 0, "ignore_eos": True})
    try:
        for _ in range(2):
            assert json.loads(next_event(response))["choices"][0]["finish_reason"] is None
    finally:
        connection.close()  # the client goes away mid-stream: the router aborts the request on both workers
    workers = cluster.wait_until_idle()
    assert {w["role"] for w in workers.values()} == {"prefill", "decode"}
    assert all(w["used"] == 0 and w["running"] == 0 for w in workers.values()), workers
    assert cluster.router_metric(cancelled) == before + 1  # cancelled, not run to its 1000th token


def test_health_and_metrics_are_served_on_the_http_port(cluster):
    root = cluster.http_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/health", timeout=10) as health:
        assert health.status == 200 and json.load(health) == {"status": "ok"}
    with urllib.request.urlopen(f"{root}/metrics", timeout=10) as metrics:
        text = metrics.read().decode()
    assert metrics.status == 200 and "pdserve_requests_total" in text
    assert 'pdserve_requests_total{outcome="length"}' in text


def test_every_workers_metrics_through_the_router(cluster):
    """/metrics/workers gathers each worker's metrics over Ray: one scrape target on any topology."""
    root = cluster.http_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/metrics/workers", timeout=30) as response:
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    steps = {s.labels["worker_id"] for s in families["pdserve_worker_step_seconds"].samples}
    assert steps == set(cluster.workers())
    assert families["pdserve_worker_scrape_failures"].samples[0].value == 0


def worker_counter(cluster, name: str, worker_id: str) -> float:
    root = cluster.http_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/metrics/workers", timeout=30) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    return sum(s.value for s in families[name].samples
               if s.labels["worker_id"] == worker_id and s.name.endswith("_total"))


def test_speculation_on_the_decode_worker_keeps_greedy_output_identical(cluster, client, engine):
    """The basic cluster's decode worker speculates by prompt lookup (conftest.BASIC_CLUSTER): on text that copies
    its prompt it accepts proposals, and the answer is the local engine's, which does not speculate."""
    source = "def area(width, height):\n    return width * height\n\n"
    prompt = source * 3 + "def area("
    (decode,) = [w for w in cluster.workers() if w.startswith("decode")]
    before = worker_counter(cluster, "pdserve_worker_speculative_accepted_tokens", decode)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0).choices[0]
    assert got.text == local(engine, Prompt(text=prompt), 32).text
    deadline = time.monotonic() + 10  # the worker's counters are read off its engine after each step
    while worker_counter(cluster, "pdserve_worker_speculative_accepted_tokens", decode) <= before:
        assert time.monotonic() < deadline, "no proposal accepted"
        time.sleep(0.5)

    async def through_grpc():
        async with Client(cluster.address, timeout_s=120) as grpc_client:
            return await grpc_client.generate(Prompt(text=prompt), SamplingParams(max_tokens=32, temperature=0))

    result = asyncio.run(through_grpc())  # the request's timings count its proposals
    assert result.text == got.text
    assert result.timings.speculative_proposed >= result.timings.speculative_accepted > 0
