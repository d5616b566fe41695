"""OpenAI's wire format for the HTTP API: the request bodies we accept, how they become our `GenerateRequest`s, and
the response bodies and stream chunks we send back.

A request is checked in two steps: here for OpenAI's own fields (types by pydantic; features we do not offer, such as
logprobs, tools or penalties, are refused naming the field rather than silently ignored), then by the router's
`RequestBuilder` exactly as a gRPC request is (prompt, sampling, context length). Every other field follows
`openai_fields`: accepted when it cannot change the output (`user`, `metadata`, `store`, ..., or a vLLM extension at
its neutral value), else refused by name. vLLM's extensions `top_k`, `ignore_eos`, `stop_token_ids` and
`return_token_ids` are honoured. With `n` > 1 and a `seed`, choice j of a prompt samples with `choice_seed(seed, j)`:
each choice its own stream of randomness, the same on every run (choice 0 keeps the seed, so n = 1 is unchanged).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr

from pdserve.engine.logprobs import MAX_TOP_LOGPROBS
from pdserve.proto import generation_pb2 as pb
from pdserve.router.openai_fields import FieldRefused, refuse_unhonoured
from pdserve.router.openai_structured import GUIDED_FIELDS, StructuredFieldError, structured_output

MAX_CHOICES = 64
"""Prompts x n of one request; more is refused (each choice is a request on the cluster)."""
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def _no_bool(value: Any) -> Any:
    """JSON true/false are not numbers (pydantic would take true as 1)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


def _encodable(value: str) -> str:
    """JSON may escape a lone surrogate ("\\ud800"), which no UTF-8 text (nor protobuf string) can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid Unicode text (a lone surrogate at character {e.start})") from e
    return value


def _integer(low: int, high: int) -> Any:
    """An integer in [low, high]: each bound is its protobuf field's (or tighter)."""
    def in_range(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be an integer in [{low}, {high}], got {value}")
        return value

    return Annotated[int, BeforeValidator(_no_bool), AfterValidator(in_range)]


Text = Annotated[str, AfterValidator(_encodable)]
TokenId = _integer(0, INT32_MAX)
Number = Annotated[float, BeforeValidator(_no_bool)]


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: refused when true (usage comes once, at the end)


class _Common(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="allow")  # the rest: checked by `openai_fields` (refuse_unsupported)

    model: Text | None = None
    max_tokens: _integer(1, UINT32_MAX) | None = None
    temperature: Number | None = Field(default=None, ge=0)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    n: _integer(1, MAX_CHOICES) = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: _integer(0, UINT64_MAX) | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    top_k: _integer(0, INT32_MAX) | None = None  # vLLM's extension
    repetition_penalty: Number | None = None  # vLLM's extension
    min_tokens: _integer(0, UINT32_MAX) | None = None  # vLLM's extension
    min_p: Number | None = None  # vLLM's extension
    allowed_token_ids: list[TokenId] | None = None  # vLLM's extension
    prompt_logprobs: _integer(0, MAX_TOP_LOGPROBS) | None = None  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension
    stop_token_ids: list[TokenId] | None = None  # vLLM's extension
    return_token_ids: bool = False  # vLLM's extension: each choice (and stream chunk) carries its token ids
    priority: _integer(-INT32_MAX - 1, INT32_MAX) = 0  # vLLM's extension: lower is served first; above 0, spare room
    _structured: pb.StructuredOutput | None = PrivateAttr(default=None)
    # structured output (`openai_structured`): OpenAI's, vLLM's, and vLLM's older names
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def refuse_unsupported(self) -> None:
        """Features that would change the output and that we do not offer: refused, naming the field."""
        try:
            refuse_unhonoured(self.model_extra)
        except FieldRefused as e:
            raise unsupported(e.field, e.why) from e
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options: only allowed with stream: true", param="stream_options")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise unsupported("stream_options.continuous_usage_stats", "not supported; usage comes in the last "
                              "chunk (include_usage)")
        self._structured = self._structured_output()

    def _structured_output(self) -> pb.StructuredOutput | None:
        guided = {name: getattr(self, name) for name in GUIDED_FIELDS if getattr(self, name) is not None}
        try:
            return structured_output(self.response_format, self.structured_outputs, guided)
        except StructuredFieldError as e:
            raise OpenAIError(400, str(e), param=e.field) from e

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, max_tokens: int | None, choice: int = 0) -> pb.SamplingParams:
        """The sampling of choice `choice` of a prompt (its own seed, derived from `seed`)."""
        s = pb.SamplingParams(stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or ()),
                              stop_token_ids=list(self.stop_token_ids or ()), ignore_eos=self.ignore_eos)
        for name, value in (("max_tokens", max_tokens), ("temperature", self.temperature), ("top_p", self.top_p),
                            ("top_k", self.top_k), ("seed", choice_seed(self.seed, choice)),
                            ("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty),
                            ("repetition_penalty", self.repetition_penalty), ("min_tokens", self.min_tokens),
                            ("min_p", self.min_p)):
            if value is not None:
                setattr(s, name, value)
        s.allowed_token_ids.extend(self.allowed_token_ids or ())
        if self.logprobs_asked is not None:
            s.logprobs = self.logprobs_asked
        if self.prompt_logprobs_asked is not None:
            s.prompt_logprobs = self.prompt_logprobs_asked
        for token, bias in self._logit_bias().items():
            s.logit_bias[token] = bias
        if self._structured is not None:
            s.structured_output.CopyFrom(self._structured)
        return s

    def _logit_bias(self) -> dict[int, float]:
        """OpenAI's logit_bias maps token ids, written as strings, to biases."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise OpenAIError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias") from None
            if not 0 <= token <= INT32_MAX:
                raise OpenAIError(400, f"logit_bias: token {token} is out of vocabulary", param="logit_bias")
            bias[token] = value
        return bias


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    echo: bool = False
    logprobs: _integer(0, MAX_TOP_LOGPROBS) | None = None
    best_of: int | None = None
    suffix: str | None = None

    def generate_requests(self) -> list[pb.GenerateRequest]:
        """One per prompt and choice (prompt-major, as OpenAI numbers the choices)."""
        self.refuse_unsupported()
        for name, bad in (("best_of", self.best_of not in (None, 1)), ("suffix", bool(self.suffix))):
            if bad:
                raise unsupported(name, "not supported")
        prompts = self._prompts()
        _check_choices(len(prompts) * self.n)
        requests = []
        for prompt in prompts:
            for choice in range(self.n):
                request = pb.GenerateRequest(sampling=self.sampling(self.max_tokens, choice), priority=self.priority)
                if isinstance(prompt, str):
                    request.text = prompt
                else:
                    request.token_ids.ids.extend(prompt)
                requests.append(request)
        return requests

    @property
    def logprobs_asked(self) -> int | None:
        """How many alternatives each token's logprobs carry (None: no logprobs)."""
        return self.logprobs

    @property
    def prompt_logprobs_asked(self) -> int | None:
        """`echo` with `logprobs` shows the prompt tokens' logprobs too (as lm-eval's loglikelihood reads them)."""
        asked = [n for n in (self.prompt_logprobs, self.logprobs if self.echo else None) if n is not None]
        return max(asked) if asked else None

    def prompt_texts(self, decode) -> list[str]:
        """Each prompt's text: as given, or `decode(token ids)`."""
        return [p if isinstance(p, str) else decode(p) for p in self._prompts()]

    def _prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise OpenAIError(400, "prompt: must not be empty", param="prompt")
        return list(prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...

    role: Text  # "developer" is taken as "system"; any other role name goes to the chat template (engine.request)
    content: Text | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text":
                raise unsupported(f"messages[{index}].content", f"content parts of type {part.type!r} are not "
                                  "supported (this model reads text)")
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: _integer(1, UINT32_MAX) | None = None
    logprobs: bool = False
    top_logprobs: _integer(0, MAX_TOP_LOGPROBS) | None = None
    tools: list[dict[str, Any]] | None = None

    def generate_requests(self) -> list[pb.GenerateRequest]:
        self.refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs: only allowed with logprobs: true", param="top_logprobs")
        if self.tools:
            raise unsupported("tools", "tool calling is not supported")
        _check_choices(self.n)
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        messages = pb.ChatMessages(messages=[
            pb.ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text(i))
            for i, m in enumerate(self.messages)])
        return [pb.GenerateRequest(messages=messages, sampling=self.sampling(max_tokens, choice),
                                   priority=self.priority) for choice in range(self.n)]

    @property
    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def prompt_logprobs_asked(self) -> int | None:
        return self.prompt_logprobs

    @property
    def max_tokens_given(self) -> bool:
        return self.max_tokens is not None or self.max_completion_tokens is not None


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of a prompt's choice `choice`: `seed` itself for the first, a different one (reproducibly) for each
    other (n > 1 with a seed used to give n identical choices)."""
    if seed is None or choice == 0:
        return seed
    return (seed + choice * SEED_STRIDE) % 2**64


SEED_STRIDE = 0x9E3779B97F4A7C15
"""Odd, so the n seeds of one request never collide (the golden-ratio constant spreads them)."""


def unsupported(field: str, why: str) -> OpenAIError:
    return OpenAIError(400, f"{field}: {why}", param=field, code="unsupported_parameter")


def _check_choices(count: int) -> None:
    if count > MAX_CHOICES:
        raise OpenAIError(400, f"n: prompts x n = {count} choices, more than the {MAX_CHOICES} one request may ask "
                          "for", param="n")


@dataclass
class UsageCount:
    """A response's token counts as OpenAI reports them: each prompt once (n choices share it), every choice's
    completion, and the prompt tokens served from a prefix cache (`prompt_tokens_details.cached_tokens`)."""

    prompt_tokens: int
    choices_per_prompt: int
    completion_tokens: int = 0
    cached_tokens: int = 0

    def finished(self, index: int, completion_tokens: int, cached_tokens: int) -> None:
        """Choice `index` ended with these counts."""
        self.completion_tokens += completion_tokens
        if index % self.choices_per_prompt == 0:
            self.cached_tokens += cached_tokens

    def body(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def completion_body(request_id: str, model: str, texts: list[str], finish: list[str | None],
                    usage_: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish[i]}
                        for i, text in enumerate(texts)], "usage": usage_}


def chat_body(request_id: str, model: str, texts: list[str], finish: list[str | None],
              usage_: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish[i]} for i, text in enumerate(texts)], "usage": usage_}


def completion_chunk(request_id: str, model: str, created: int, index: int, text: str,
                     finish: str | None) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_chunk(request_id: str, model: str, created: int, index: int, delta: dict[str, str],
               finish: str | None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(request_id: str, model: str, created: int, chat: bool, usage_: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage_}
