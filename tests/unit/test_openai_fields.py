"""The HTTP API's rule for fields (`router.openai_fields`): each field is honoured or refused with a 400 naming it;
output-neutral ones are accepted; `n` > 1 with a seed gives each choice its own seed; `stream_options` needs
`stream`; `GET /v1/models/{id}`. On the real app with the fake orchestrator of `test_http_server`."""

import pytest

from pdserve.router.openai_protocol import SEED_STRIDE, choice_seed

from .test_http_server import CHAT, MODEL, FakeOrchestrator, assert_error, client_for, events


def post(path: str, extra: dict):
    orchestrator = FakeOrchestrator()
    prompt = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    response = client_for(orchestrator).post(path, json={**prompt, "max_tokens": 2, **extra})
    return response, orchestrator


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("field, value", [
    ("use_beam_search", True), ("length_penalty", 0.5),
    ("guided_decoding_backend", "xgrammar"), ("guided_whitespace_pattern", " "),
    ("truncate_prompt_tokens", 8), ("include_stop_str_in_output", True), ("skip_special_tokens", False),
    ("bad_words", ["x"]), ("continue_final_message", True), ("echo_everything", 1),
    ("maxtokens", 3), ("use_beam_search", 0), ("length_penalty", True),
])
def test_a_field_we_would_ignore_is_refused_naming_it(path, field, value):
    response, orchestrator = post(path, {field: value})
    message = assert_error(response, 400, "invalid_request_error", field, "unsupported_parameter")
    assert message.startswith(f"{field}: ")
    assert orchestrator.received == []


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("extra", [
    {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto"},
    {"use_beam_search": False, "length_penalty": 1.0, "skip_special_tokens": True,
     "include_stop_str_in_output": False, "structured_outputs": None, "guided_json": None, "priority": 0},
    {"add_generation_prompt": True, "continue_final_message": False, "tool_choice": "none"},
])
def test_fields_that_cannot_change_the_output_are_accepted(path, extra):
    response, orchestrator = post(path, extra)
    assert response.status_code == 200, response.text
    assert len(orchestrator.received) == 1


def test_stream_options_need_stream_and_continuous_usage_is_refused():
    response, _ = post("/v1/completions", {"stream_options": {"include_usage": True}})
    assert assert_error(response, 400, param="stream_options").startswith("stream_options: only allowed with")
    response, _ = post("/v1/chat/completions", {"stream": True, "stream_options": {"continuous_usage_stats": True}})
    assert_error(response, 400, param="stream_options.continuous_usage_stats", code="unsupported_parameter")
    response, _ = post("/v1/completions", {"stream": True, "stream_options": {"include_usage": True, "x": 1}})
    assert response.status_code == 400 and "stream_options" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_n_choices_with_a_seed_each_get_their_own_seed_reproducibly(path):
    seeds = []
    for _ in range(2):
        response, orchestrator = post(path, {"n": 3, "seed": 7})
        assert response.status_code == 200
        seeds.append([r.sampling.seed for r in orchestrator.received])
    assert seeds[0] == seeds[1] == [7, choice_seed(7, 1), choice_seed(7, 2)]
    assert len(set(seeds[0])) == 3
    response, orchestrator = post(path, {"n": 2})
    assert [r.sampling.seed for r in orchestrator.received] == [None, None]


def test_choice_seeds_stay_in_range_and_distinct():
    top = 2**64 - 1
    assert choice_seed(top, 1) == (top + SEED_STRIDE) % 2**64 < 2**64
    assert len({choice_seed(top, j) for j in range(64)}) == 64


def test_a_prompt_list_gives_each_prompt_the_same_choice_seeds():
    orchestrator = FakeOrchestrator()
    response = client_for(orchestrator).post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "seed": 1,
                                                                      "max_tokens": 2})
    assert response.status_code == 200
    assert [r.sampling.seed for r in orchestrator.received] == [1, choice_seed(1, 1)] * 2


def test_models_by_id_answers_the_served_model_and_404_for_any_other():
    client = client_for(FakeOrchestrator())
    body = client.get(f"/v1/models/{MODEL}").json()
    assert body["id"] == MODEL and body["object"] == "model"
    assert "does not exist" in assert_error(client.get("/v1/models/gpt-9"), 404, param="model",
                                            code="model_not_found")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_sampling_controls_reach_the_request_as_grpc_fields(path):
    controls = {"presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.25, "min_tokens": 1,
                "min_p": 0.125, "logit_bias": {"7": -100, "9": 2.5}, "allowed_token_ids": [7, 9, 11]}
    response, orchestrator = post(path, controls)
    assert response.status_code == 200, response.text
    sent = orchestrator.received[0].sampling
    assert (sent.presence_penalty, sent.frequency_penalty, sent.repetition_penalty, sent.min_tokens,
            sent.min_p) == (0.5, -0.25, 1.25, 1, 0.125)
    assert sent.logit_bias == ((7, -100.0), (9, 2.5)) and sent.allowed_token_ids == (7, 9, 11)


def test_a_logit_bias_key_that_is_no_token_id_is_refused_naming_it():
    response, orchestrator = post("/v1/completions", {"logit_bias": {"hello": 1}})
    assert "'hello' is not a token id" in assert_error(response, 400, param="logit_bias")
    assert orchestrator.received == []


def test_min_tokens_without_max_tokens_in_a_chat_is_taken():
    orchestrator = FakeOrchestrator()
    response = client_for(orchestrator).post("/v1/chat/completions", json={"messages": CHAT, "min_tokens": 3})
    assert response.status_code == 200, response.text
    assert orchestrator.received[0].sampling.min_tokens == 3


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_return_token_ids_shows_the_prompts_token_ids_too(path):
    orchestrator = FakeOrchestrator()
    client = client_for(orchestrator)
    prompt = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    body = {**prompt, "max_tokens": 2, "return_token_ids": True}
    choice = client.post(path, json=body).json()["choices"][0]
    assert choice["token_ids"] == [100, 101]
    assert choice["prompt_token_ids"] == list(orchestrator.received[0].token_ids)
    if path == "/v1/completions":
        assert choice["prompt_token_ids"] == list(b"hi")  # the fake tokenizer: a text's bytes
    chunks = events(client.post(path, json={**body, "stream": True}))
    firsts = [c["choices"][0]["prompt_token_ids"] for c in chunks if c.get("choices")
              and "prompt_token_ids" in c["choices"][0]]
    assert firsts == [choice["prompt_token_ids"]]  # once, on the choice's first chunk
