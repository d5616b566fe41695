"""Random GenerateRequests against a live router: every answer is a valid stream or a clean gRPC error.

A small disaggregated cluster (one prefill and one decode worker on SmolLM2) takes requests built by hypothesis
(derandomized: the same requests every run, so a failure reproduces) through the raw gRPC stub, so that fields the
Python `Client` would refuse still reach the router: empty, unicode
and very long text; chat messages with valid and junk roles; token ids that are empty, in the vocabulary, outside it
or at the int32 limits; sampling fields at and beyond their edges (max_tokens 0 or past the context, temperature
negative / NaN / inf, top_p 0 / negative / above 1 / NaN, negative top_k, empty stop strings, stop token ids outside
the vocabulary, seeds up to 2**64-1); request ids that are empty, long, unicode or reused one after another.

Every answer must be one of:

* a valid stream: one request id throughout, at least one token and no more than max_tokens, a finish reason (stop
  or length) on the last message only, completion_tokens equal to the tokens streamed, prompt_tokens on the first
  and last message;
* a gRPC error whose status is INVALID_ARGUMENT, ALREADY_EXISTS or RESOURCE_EXHAUSTED (never UNKNOWN, INTERNAL,
  UNAVAILABLE or DEADLINE_EXCEEDED) with a message that says what was wrong.

Where the documented contract settles it, the outcome must match: a request that breaks a documented rule gets
INVALID_ARGUMENT, and a plainly well-formed one gets a stream (`expected_outcome`). After the fuzz no KV block is in
use on any worker and a plain greedy request still works.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from pdserve.client import Client
from pdserve.engine import Prompt, SamplingParams
from pdserve.engine.request import ROLE_PATTERN, ROLES
from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc
from pdserve.router.request_builder import DEFAULT_MAX_TOKENS, MAX_REQUEST_ID_LEN

pytestmark = pytest.mark.model


VOCAB_SIZE = 49152
"""SmolLM2-135M's vocabulary: token ids must lie in [0, VOCAB_SIZE)."""
CONTEXT_LENGTH = 8192
"""SmolLM2-135M's context: prompt tokens + max_tokens must not exceed it."""
CALL_TIMEOUT_S = 60
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

CLEAN_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.RESOURCE_EXHAUSTED}
ENDED = {pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH}

outcomes: Counter = Counter()
"""What the fuzz saw ("stream" or a status name), checked by the last test: the fuzz ran and saw both kinds."""


@pytest.fixture(scope="module")
def cluster(basic_cluster):
    return basic_cluster


@pytest.fixture(scope="module")
def stub(cluster):
    with grpc.insecure_channel(cluster.address) as channel:
        yield pb_grpc.GenerationStub(channel)


# ---- strategies ------------------------------------------------------------------------------------------------

def _int32(value: int) -> int:
    """`ids` and `stop_token_ids` are int32 on the wire: a value up to 2**32-1 is sent as its two's complement."""
    return (value + 2**31) % 2**32 - 2**31


def _repeated(pieces: st.SearchStrategy[str], min_size: int, max_size: int) -> st.SearchStrategy[str]:
    """Long text cheaply: a short random piece repeated (a 3000-character draw would overrun hypothesis's buffer)."""
    return st.builds(lambda piece, n: (piece * n)[:n], pieces, st.integers(min_size, max_size))


SPECIAL_TEXTS = ["", " ", "\n", "\x00", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "héllo wörld 你好 🙂",
                 "\u202e\ufeff\u200b", "🙂" * 50]

WORDS = ["the", "quick", "brown", "fox", "naïve", "café", "Grüße", "über", "end.", "42", "\n"]
long_texts = _repeated(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(lambda ws: " ".join(ws) + " "),
                       2500, 3500)
"""About 3000 characters of words, under a token a character: any unicode at this length could be 4 tokens a
character, up to the whole context, and a prompt of thousands of tokens takes minutes to prefill on a busy CPU."""

texts = st.one_of(st.sampled_from(SPECIAL_TEXTS), st.text(max_size=200), long_texts)

roles = st.one_of(st.sampled_from(ROLES), st.sampled_from(ROLES),  # twice: most messages get a valid role
                  st.sampled_from(["", "User", "SYSTEM", "wizard", "assistant ", "function", "<|im_start|>"]),
                  st.text(max_size=10))

messages = st.lists(st.builds(pb.ChatMessage, role=roles, content=st.one_of(st.text(max_size=100),
                                                                            st.sampled_from(SPECIAL_TEXTS))),
                    max_size=4).map(lambda ms: pb.ChatMessages(messages=ms))

OUT_OF_VOCABULARY = [-1, VOCAB_SIZE, VOCAB_SIZE + 1, INT32_MAX, INT32_MIN, _int32(2**32 - 1)]
in_vocabulary = st.integers(0, VOCAB_SIZE - 1)
token_ids = st.one_of(
    st.lists(in_vocabulary, max_size=64),
    st.lists(st.one_of(in_vocabulary, st.sampled_from(OUT_OF_VOCABULARY),
                       st.integers(0, 2**32 - 1).map(_int32)), min_size=1, max_size=16),
).map(lambda ids: pb.TokenIds(ids=ids))

prompts = st.one_of(texts.map(lambda t: {"text": t}), messages.map(lambda m: {"messages": m}),
                    token_ids.map(lambda t: {"token_ids": t}), st.just({}))  # {}: no prompt at all


def _maybe(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), values)


SMALL_MAX_TOKENS = [0, 1, 2, 4, 8]
HUGE_MAX_TOKENS = [CONTEXT_LENGTH + 1, 100_000, 2**31, 2**32 - 1]
max_tokens = st.one_of(st.sampled_from(SMALL_MAX_TOKENS), st.sampled_from(SMALL_MAX_TOKENS),
                       st.sampled_from(HUGE_MAX_TOKENS))

EDGE_FLOATS = [0.0, -0.0, -1.0, 1e-45, 1e-6, 0.5, 1.0, 1.0000001, 2.0, 1e38, math.nan, math.inf, -math.inf]
floats32 = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(width=32))

top_k = st.one_of(st.sampled_from([-1, 0, 1, 40, VOCAB_SIZE - 1, VOCAB_SIZE, INT32_MAX, INT32_MIN]),
                  st.integers(INT32_MIN, INT32_MAX))

stop_strings = st.lists(st.one_of(st.sampled_from(["", "\n", ".", " the", "<|im_end|>"]), st.text(max_size=8)),
                        max_size=3)
stop_token_ids = st.lists(st.one_of(in_vocabulary, st.sampled_from(OUT_OF_VOCABULARY)), max_size=4)


@st.composite
def samplings(draw) -> pb.SamplingParams | None:
    if draw(st.booleans()) and draw(st.booleans()):
        return None  # a quarter of the requests leave sampling unset: all defaults
    fields = {"max_tokens": draw(_maybe(max_tokens)), "temperature": draw(_maybe(floats32)),
              "top_p": draw(_maybe(floats32)), "top_k": draw(_maybe(top_k)),
              "seed": draw(_maybe(st.integers(0, 2**64 - 1)))}
    sampling = pb.SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    sampling.stop.extend(draw(stop_strings))
    sampling.stop_token_ids.extend(draw(stop_token_ids))
    sampling.ignore_eos = draw(st.booleans())
    return sampling


request_ids = st.one_of(
    st.just(""),                       # the router makes one
    st.just("fuzz-reused"),            # the same id again and again, each time after the last one ended
    st.text(max_size=40),              # unicode, NUL, ...
    st.sampled_from([MAX_REQUEST_ID_LEN, MAX_REQUEST_ID_LEN + 1]).map(lambda n: "r" * n),
    _repeated(st.text(min_size=1, max_size=16), MAX_REQUEST_ID_LEN + 1, 1000),
)


@st.composite
def wild_requests(draw) -> pb.GenerateRequest:
    """Any field anywhere in its range: most of these break some rule."""
    request = pb.GenerateRequest(request_id=draw(request_ids), **draw(prompts))
    sampling = draw(samplings())
    if sampling is not None:
        request.sampling.CopyFrom(sampling)
    return request


@st.composite
def lawful_requests(draw) -> pb.GenerateRequest:
    """Every field inside its documented range, edges included, so that the serving path is fuzzed too."""
    prompt = draw(st.one_of(
        st.one_of(st.sampled_from(SPECIAL_TEXTS[1:]), st.text(min_size=1, max_size=200)).map(lambda t: {"text": t}),
        st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(ROLES), content=st.text(max_size=100)),
                 min_size=1, max_size=4).map(lambda ms: {"messages": pb.ChatMessages(messages=ms)}),
        st.lists(in_vocabulary, min_size=1, max_size=64).map(lambda ids: {"token_ids": pb.TokenIds(ids=ids)})))
    request = pb.GenerateRequest(request_id=draw(st.one_of(st.just(""), st.just("fuzz-reused"),
                                                           st.text(max_size=40))), **prompt)
    fields = {"max_tokens": draw(st.one_of(st.none(), *[st.sampled_from(SMALL_MAX_TOKENS[1:])] * 2)),
              "temperature": draw(_maybe(st.sampled_from([0.0, -0.0, 1e-45, 1e-5, 0.7, 1.0, 5.0, 1e38]))),
              "top_p": draw(_maybe(st.sampled_from([1e-45, 0.1, 0.9, 1.0]))),
              "top_k": draw(_maybe(st.sampled_from([0, 1, 40, VOCAB_SIZE - 1, VOCAB_SIZE, INT32_MAX]))),
              "seed": draw(_maybe(st.integers(0, 2**64 - 1)))}
    request.sampling.CopyFrom(pb.SamplingParams(**{k: v for k, v in fields.items() if v is not None}))
    request.sampling.stop.extend(draw(st.lists(st.text(min_size=1, max_size=8), max_size=3)))
    request.sampling.stop_token_ids.extend(draw(st.lists(in_vocabulary, max_size=4)))
    request.sampling.ignore_eos = draw(st.booleans())
    return request


requests = st.one_of(wild_requests(), lawful_requests())


# ---- the contract ----------------------------------------------------------------------------------------------

def max_tokens_of(request: pb.GenerateRequest) -> int:
    s = request.sampling
    return s.max_tokens if request.HasField("sampling") and s.HasField("max_tokens") else DEFAULT_MAX_TOKENS


def broken_rules(request: pb.GenerateRequest) -> list[str]:
    """The documented rules `request` breaks (any one makes it INVALID_ARGUMENT)."""
    broken = []
    if len(request.request_id) > MAX_REQUEST_ID_LEN:
        broken.append("request_id too long")
    which = request.WhichOneof("prompt")
    if which is None:
        broken.append("no prompt")
    elif which == "text" and not request.text:
        broken.append("empty text")
    elif which == "messages":
        if not request.messages.messages:
            broken.append("no messages")
        if any(not ROLE_PATTERN.fullmatch(m.role) for m in request.messages.messages):
            broken.append("not a role name")
    elif which == "token_ids":
        if not request.token_ids.ids:
            broken.append("no token ids")
        if any(not 0 <= t < VOCAB_SIZE for t in request.token_ids.ids):
            broken.append("token id outside the vocabulary")
    if max_tokens_of(request) == 0:
        broken.append("max_tokens 0")
    if max_tokens_of(request) > CONTEXT_LENGTH:
        broken.append("max_tokens beyond the context")
    if request.HasField("sampling"):
        s = request.sampling
        if s.HasField("temperature") and not (math.isfinite(s.temperature) and s.temperature >= 0):
            broken.append("temperature not finite and >= 0")
        if s.HasField("top_p") and not 0 < s.top_p <= 1:
            broken.append("top_p outside (0, 1]")
        if s.HasField("top_k") and s.top_k < 0:
            broken.append("negative top_k")
        if any(not stop for stop in s.stop):
            broken.append("empty stop string")
        if any(not 0 <= t < VOCAB_SIZE for t in s.stop_token_ids):
            broken.append("stop token id outside the vocabulary")
    return broken


def plainly_short(request: pb.GenerateRequest) -> bool:
    """A prompt far inside the context whatever its characters (at most 4 tokens each, plus the chat template)."""
    which = request.WhichOneof("prompt")
    if which == "text":
        return len(request.text) <= 500
    if which == "messages":
        return sum(len(m.content) for m in request.messages.messages) <= 500
    return which == "token_ids"


def expected_outcome(request: pb.GenerateRequest) -> str | None:
    """"invalid" (INVALID_ARGUMENT), "stream", or None where the contract allows either.

    Either is allowed for a long prompt (it may or may not fit the context with its max_tokens)."""
    if broken_rules(request):
        return "invalid"
    return "stream" if plainly_short(request) else None


def check_stream(request: pb.GenerateRequest, responses: list[pb.GenerateResponse]) -> None:
    assert responses, "the stream ended without a message and without an error"
    ids = {r.request_id for r in responses}
    assert len(ids) == 1, f"request ids changed within the stream: {ids}"
    request_id = responses[0].request_id
    assert request_id, "the stream carries no request id"
    if request.request_id:
        assert request_id == request.request_id, (request_id, request.request_id)
    *body, last = responses
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in body), "a finish reason before the end"
    assert last.finish_reason in ENDED, f"the stream ended with {pb.FinishReason.Name(last.finish_reason)}"
    tokens = [t for r in responses for t in r.token_ids]
    assert last.completion_tokens == len(tokens), (last.completion_tokens, len(tokens))
    assert 1 <= len(tokens) <= max_tokens_of(request), (len(tokens), max_tokens_of(request))
    assert all(0 <= t < VOCAB_SIZE for t in tokens), tokens
    prompt_tokens = responses[0].prompt_tokens
    assert prompt_tokens > 0 and last.prompt_tokens == prompt_tokens
    if request.WhichOneof("prompt") == "token_ids":
        assert prompt_tokens == len(request.token_ids.ids)
    if last.finish_reason == pb.FINISH_REASON_LENGTH and prompt_tokens + max_tokens_of(request) < CONTEXT_LENGTH:
        assert len(tokens) == max_tokens_of(request), "finish reason length before max_tokens"
    assert last.HasField("timings") and 0 < last.timings.ttft_s <= last.timings.e2e_s


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests)
def test_random_requests_get_a_valid_stream_or_a_clean_error(stub, request):
    expected = expected_outcome(request)
    note(f"expected: {expected} (breaks: {broken_rules(request)})")
    try:
        responses = list(stub.Generate(request, timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        outcomes[code.name] += 1
        event(f"status {code.name}")
        note(f"router answered {code.name}: {details!r}")
        assert code in CLEAN_ERRORS, f"{code.name}: {details!r}"
        assert details.strip(), f"{code.name} without a message"
        assert expected != "stream", f"a well-formed request was refused: {code.name}: {details!r}"
        if expected == "invalid":
            assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details!r}"
        return
    outcomes["stream"] += 1
    event("stream")
    note(f"router streamed {len(responses)} messages: {responses[-1]}")
    assert expected != "invalid", f"a request breaking {broken_rules(request)} was served"
    check_stream(request, responses)


def test_after_the_fuzz_no_kv_block_is_in_use_and_greedy_still_works(cluster):
    assert outcomes["stream"] > 0 and outcomes["INVALID_ARGUMENT"] > 0, f"the fuzz did not run as meant: {outcomes}"
    workers = cluster.wait_until_idle()
    assert {w["role"] for w in workers.values()} == {"prefill", "decode"}
    assert all(w["used"] == 0 and w["running"] == 0 for w in workers.values()), workers

    async def greedy():
        async with Client(cluster.address, timeout_s=CALL_TIMEOUT_S) as client:
            return await client.generate(Prompt(text="Hello"), SamplingParams(max_tokens=4, temperature=0))

    result = asyncio.run(greedy())
    assert len(result.token_ids) == 4 and result.finish_reason == "length"
