"""The router's checks on a GenerateRequest: each problem names its field (random weights: no tokenizer)."""

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
