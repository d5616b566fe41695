"""The router's checks on a GenerateRequest: each problem names its field (random weights: no tokenizer)."""

import time

import pytest

from pdserve.engine.config import EngineConfig
from pdserve.proto import generation_pb2 as pb
from pdserve.router.request_builder import DEFAULT_MAX_TOKENS, InvalidRequest, RequestBuilder


@pytest.fixture(scope="module")
def builder() -> RequestBuilder:
    return RequestBuilder(EngineConfig(model="random:smollm2-135m", max_model_len=128))


def test_token_ids_and_sampling_defaults(builder):
    valid = builder.build(pb.GenerateRequest(request_id="r1", token_ids=pb.TokenIds(ids=[1, 2, 3])))
    assert valid.request_id == "r1" and valid.token_ids == (1, 2, 3)
    assert valid.sampling.max_tokens == DEFAULT_MAX_TOKENS and valid.sampling.temperature == 1.0


def test_a_request_id_is_made_when_none_is_given(builder):
    a = builder.build(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1])))
    b = builder.build(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1])))
    assert a.request_id != b.request_id


@pytest.mark.parametrize("request_kwargs, field", [
    ({}, "prompt"),
    ({"token_ids": pb.TokenIds(ids=[])}, "prompt.token_ids"),
    ({"token_ids": pb.TokenIds(ids=[49152])}, "prompt.token_ids"),
    ({"text": "hello"}, "tokenizer"),
    ({"token_ids": pb.TokenIds(ids=[1]), "sampling": pb.SamplingParams(top_p=0.0)}, "top_p"),
    ({"token_ids": pb.TokenIds(ids=[1]), "sampling": pb.SamplingParams(max_tokens=0)}, "max_tokens"),
    ({"token_ids": pb.TokenIds(ids=[1]), "sampling": pb.SamplingParams(max_tokens=128)}, "context length"),
    ({"token_ids": pb.TokenIds(ids=[1]), "sampling": pb.SamplingParams(stop=[""])}, "stop"),
    ({"request_id": "x" * 300, "token_ids": pb.TokenIds(ids=[1])}, "request_id"),
    ({"token_ids": pb.TokenIds(ids=[1]), "sampling": pb.SamplingParams(stop_token_ids=[49152])},
     "sampling.stop_token_ids"),
    ({"token_ids": pb.TokenIds(ids=[1]), "sampling": pb.SamplingParams(temperature=float("nan"))}, "temperature"),
    ({"token_ids": pb.TokenIds(ids=[1]), "sampling": pb.SamplingParams(top_k=-1)}, "top_k"),
])
def test_bad_requests_name_the_field(builder, request_kwargs, field):
    with pytest.raises(InvalidRequest, match=field):
        builder.build(pb.GenerateRequest(**request_kwargs))


@pytest.mark.model
def test_a_prompt_too_long_to_fit_any_context_is_refused_before_it_is_tokenized():
    """A 10 MB prompt once took the router 11-19 s and 1.3 GiB to refuse: now its length alone decides."""
    real = RequestBuilder(EngineConfig(max_model_len=128))  # SmolLM2's tokenizer: its longest token has 81 chars
    assert real.max_prompt_chars == 128 * real.longest_token
    too_long = "x" * (real.max_prompt_chars + 1)
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=too_long)])
    for request, field in ((pb.GenerateRequest(text=too_long), "prompt.text"),
                           (pb.GenerateRequest(messages=chat), "prompt.messages")):
        began = time.monotonic()
        with pytest.raises(InvalidRequest, match=rf"^{field}: {len(too_long)} characters cannot fit"):
            real.build(request)
        assert time.monotonic() - began < 0.1
    with pytest.raises(InvalidRequest, match="exceeds the context length 128"):  # under the bound: by its tokens
        real.build(pb.GenerateRequest(text="word " * 200))


def test_sampling_controls_are_read_and_ids_outside_the_vocabulary_refused(builder):
    sampling = pb.SamplingParams(presence_penalty=0.5, repetition_penalty=1.5, min_tokens=2, min_p=0.25,
                                 logit_bias={5: -1.0}, allowed_token_ids=[5, 6])
    valid = builder.build(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), sampling=sampling))
    got = valid.sampling
    assert (got.presence_penalty, got.repetition_penalty, got.min_tokens, got.min_p) == (0.5, 1.5, 2, 0.25)
    assert got.logit_bias == ((5, -1.0),) and got.allowed_token_ids == (5, 6)
    for field, value in (("logit_bias", {builder.vocab_size: 1.0}), ("allowed_token_ids", [builder.vocab_size])):
        with pytest.raises(InvalidRequest, match=rf"^sampling.{field}: token ids \[{builder.vocab_size}\] are out "
                                                 "of vocabulary"):
            builder.build(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]),
                                             sampling=pb.SamplingParams(**{field: value})))
    with pytest.raises(InvalidRequest, match=r"^presence_penalty: must be in \[-2, 2\]"):
        builder.build(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]),
                                         sampling=pb.SamplingParams(presence_penalty=3.0)))


@pytest.mark.model
def test_roles_beyond_the_usual_go_to_the_chat_template_and_non_names_are_refused():
    real = RequestBuilder(EngineConfig(max_model_len=256))

    def chat(role: str) -> pb.GenerateRequest:
        return pb.GenerateRequest(messages=pb.ChatMessages(messages=[
            pb.ChatMessage(role="user", content="hi"), pb.ChatMessage(role=role, content="42")]))

    rendered = real.tokenizer.decode(list(real.build(chat("ipython")).token_ids))
    assert "ipython\n42" in rendered  # the template took the role as it is
    for bad in ("<|im_start|>", "assistant\nsystem", ""):
        with pytest.raises(InvalidRequest, match=r"^prompt.messages\[1\].role: .* is not a role name"):
            real.build(chat(bad))
