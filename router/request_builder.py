"""From a client's `GenerateRequest` to a checked request: token ids and `SamplingParams`.

Every problem raises `InvalidRequest` with the field's name, which the server returns as INVALID_ARGUMENT. The router
tokenizes (workers get token ids), so a bad prompt never reaches a worker.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pdserve.engine.config import EngineConfig
from pdserve.engine.model_source import context_length, read_model_config, resolve_engine_model
from pdserve.engine.request import ONLINE_PRIORITY, Message, Prompt, PromptError
from pdserve.engine.sampling_params import SamplingError, SamplingParams
from pdserve.engine.structured_output import GuideKind, StructuredOutput
from pdserve.engine.tokenizer import Tokenizer, load_tokenizer, tokenize_prompt
from pdserve.proto import generation_pb2 as pb

DEFAULT_MAX_TOKENS = 16
MAX_REQUEST_ID_LEN = 256


class InvalidRequest(ValueError):
    """The message names the field that is wrong."""


@dataclass(frozen=True)
class Resume:
    """The client reconnected holding these tokens of the request's output."""

    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    token_ids: tuple[int, ...]
    sampling: SamplingParams
    resume: Resume | None = None
    resumed_tokens: int = 0
    """A continuation (`migration`): the prompt's last tokens are output the client already has."""
    priority: int = ONLINE_PRIORITY
    """Lower is served first; above ONLINE_PRIORITY the router sends it to workers only into spare capacity
    (`router.priority_gate`)."""


class RequestBuilder:
    def __init__(self, engine: EngineConfig) -> None:
        source = resolve_engine_model(engine)
        model_config = read_model_config(source)
        self.vocab_size = model_config.vocab_size
        self.context_length = context_length(engine, model_config)
        self.tokenizer = load_tokenizer(source)
        self.longest_token = _longest_token_chars(self.tokenizer)
        self.max_prompt_chars = self.context_length * self.longest_token if self.longest_token else None
        """A prompt text longer than this cannot fit the context whatever it says: refused before it is tokenized
        (a 10 MB prompt once took a router 11-19 s and 1.3 GiB to refuse)."""

    def build(self, request: pb.GenerateRequest) -> ValidRequest:
        request_id = request.request_id or f"req-{uuid.uuid4().hex}"
        if len(request_id) > MAX_REQUEST_ID_LEN:
            raise InvalidRequest(f"request_id: longer than {MAX_REQUEST_ID_LEN} characters")
        self._check_length(request)
        try:
            token_ids = tokenize_prompt(_prompt(request), self.tokenizer, self.vocab_size)
            sampling = sampling_params(request.sampling if request.HasField("sampling") else pb.SamplingParams())
        except (PromptError, SamplingError) as e:
            raise InvalidRequest(str(e)) from e
        for name, ids in (("stop_token_ids", sampling.stop_token_ids),
                          ("allowed_token_ids", sampling.allowed_token_ids),
                          ("logit_bias", [t for t, _ in sampling.logit_bias])):
            outside = [t for t in ids if t >= self.vocab_size]
            if outside:
                raise InvalidRequest(f"sampling.{name}: token ids {outside[:5]} are out of vocabulary [0, "
                                     f"{self.vocab_size})")
        total = len(token_ids) + sampling.max_tokens
        if total > self.context_length:
            raise InvalidRequest(f"sampling.max_tokens: prompt ({len(token_ids)} tokens) + max_tokens "
                                 f"({sampling.max_tokens}) = {total} exceeds the context length {self.context_length}")
        resume = self._resume(request.resume, sampling) if request.HasField("resume") else None
        if resume is not None and not request.request_id:
            raise InvalidRequest("request_id: a resumed request must carry the id it was first sent with")
        return ValidRequest(request_id, tuple(token_ids), sampling, resume, priority=request.priority)

    def _check_length(self, request: pb.GenerateRequest) -> None:
        which = request.WhichOneof("prompt")
        if self.max_prompt_chars is None or which not in ("text", "messages"):
            return
        chars = len(request.text) if which == "text" else sum(len(m.content) for m in request.messages.messages)
        if chars > self.max_prompt_chars:
            raise InvalidRequest(f"prompt.{which}: {chars} characters cannot fit the context of "
                                 f"{self.context_length} tokens (no token is longer than {self.longest_token} "
                                 f"characters)")

    def _resume(self, resume: pb.Resume, sampling: SamplingParams) -> Resume:
        ids = tuple(resume.token_ids)
        if len(ids) != resume.tokens_received:
            raise InvalidRequest(f"resume.token_ids: {len(ids)} tokens given, but tokens_received is "
                                 f"{resume.tokens_received}")
        if len(ids) > sampling.max_tokens:
            raise InvalidRequest(f"resume.tokens_received: {len(ids)} is more than max_tokens ({sampling.max_tokens})")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"resume.token_ids: {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return Resume(ids)


def _longest_token_chars(tokenizer: Tokenizer | None) -> int:
    """The most characters one token of the vocabulary decodes to (0 without a tokenizer)."""
    if tokenizer is None:
        return 0
    return max(len(text) for text in tokenizer.hf.convert_ids_to_tokens(range(len(tokenizer.hf))) if text)


def _prompt(request: pb.GenerateRequest) -> Prompt:
    which = request.WhichOneof("prompt")
    if which == "text":
        return Prompt(text=request.text)
    if which == "messages":
        return Prompt(messages=tuple(Message(m.role, m.content) for m in request.messages.messages))
    if which == "token_ids":
        return Prompt(token_ids=tuple(request.token_ids.ids))
    raise PromptError("prompt: give one of text, messages or token_ids")


def sampling_params(s: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
        presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else 0.0,
        frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else 0.0,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        min_tokens=s.min_tokens if s.HasField("min_tokens") else 0,
        min_p=s.min_p if s.HasField("min_p") else 0.0,
        logit_bias=tuple(sorted(s.logit_bias.items())), allowed_token_ids=tuple(s.allowed_token_ids),
        logprobs=s.logprobs if s.HasField("logprobs") else None,
        prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
        structured_output=structured_output(s.structured_output) if s.HasField("structured_output") else None)


def structured_output(s: pb.StructuredOutput) -> StructuredOutput | None:
    """Raises StructuredOutputError (a SamplingError) naming the field when the spec is invalid."""
    which = s.WhichOneof("kind")
    if which is None or (which == "json_object" and not s.json_object):
        return None
    if which == "choice":
        return StructuredOutput(GuideKind.CHOICE, choices=tuple(s.choice.choices))
    kind = {"json_schema": GuideKind.JSON, "json_object": GuideKind.JSON_OBJECT, "regex": GuideKind.REGEX,
            "grammar": GuideKind.GRAMMAR}[which]
    return StructuredOutput(kind, "" if kind is GuideKind.JSON_OBJECT else getattr(s, which))
