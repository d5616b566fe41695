"""The HTTP API's answers, assembled from the pieces the orchestrator yields per choice (`choices.merged`): one
whole body, or the chunks of a server-sent-event stream, in OpenAI's shapes (`openai_protocol`), with what the
request asked for besides the text: token ids (vLLM's `return_token_ids`: the prompt's on each choice, or on its
first chunk, and the output's), logprobs, vLLM's `prompt_logprobs`, and
the prompt echoed before a completion (`echo`).

Errors are turned into OpenAI's shape here too (`as_openai_error`): before the first token they become the HTTP
status (the caller raises them), after it a `data: {"error": ...}` event ends the stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from pdserve.engine.logprobs import TokenLogprobs
from pdserve.router import openai_protocol as oa
from pdserve.router.choices import ChoicePiece
from pdserve.router.errors import DuplicateRequest, Overloaded, TakenOver, Unavailable, WorkerError
from pdserve.router.openai_logprobs import CompletionOffsets, LogprobShapes
from pdserve.router.request_builder import InvalidRequest

REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True)
class EchoedPrompt:
    """A completion choice's prompt, shown before its text (`echo`)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Extras:
    """What a request asked for besides the text."""

    shapes: LogprobShapes
    with_token_ids: bool = False
    logprobs: bool = False
    prompt_logprobs: bool = False
    echo: tuple[EchoedPrompt, ...] | None = None
    """One per choice (completions with `echo`)."""
    prompt_ids: tuple[tuple[int, ...], ...] = ()
    """Each choice's prompt token ids (shown with `with_token_ids`)."""


async def whole_body(first: ChoicePiece, rest: AsyncIterator[ChoicePiece], request_id: str, model: str, chat: bool,
                     choices: int, usage: oa.UsageCount, extras: Extras) -> dict:
    texts: list[list[str]] = [[] for _ in range(choices)]
    token_ids: list[list[int]] = [[] for _ in range(choices)]
    logprobs: list[list[TokenLogprobs]] = [[] for _ in range(choices)]
    prompt: list[tuple[TokenLogprobs | None, ...] | None] = [None] * choices
    finish: list[str | None] = [None] * choices
    for item in [first] + [item async for item in rest]:
        texts[item.index].append(item.piece.text)
        token_ids[item.index].extend(item.piece.token_ids)
        logprobs[item.index].extend(item.piece.logprobs)
        if item.piece.prompt_logprobs is not None:
            prompt[item.index] = item.piece.prompt_logprobs
        if item.piece.finish_reason is not None:
            finish[item.index] = item.piece.finish_reason.value
            count(usage, item)
    if extras.echo is not None:
        for index, echoed in enumerate(extras.echo):
            texts[index].insert(0, echoed.text)
    build = oa.chat_body if chat else oa.completion_body
    body = build(request_id, model, ["".join(t) for t in texts], finish, usage.body())
    shapes = extras.shapes
    for index, choice in enumerate(body["choices"]):
        if extras.with_token_ids:
            choice["token_ids"] = token_ids[index]
            choice["prompt_token_ids"] = list(extras.prompt_ids[index])
        if extras.logprobs and chat:
            choice["logprobs"] = shapes.chat(logprobs[index])
        elif extras.logprobs:
            echoed = extras.echo[index] if extras.echo is not None else None
            choice["logprobs"] = shapes.completion(logprobs[index], 0, prompt[index] if echoed else None,
                                                   echoed.token_ids if echoed else ())[0]
        if extras.prompt_logprobs:
            choice["prompt_logprobs"] = shapes.prompt(prompt[index] or ())
    return body


async def stream_chunks(first: ChoicePiece, rest: AsyncIterator[ChoicePiece], request_id: str, model: str,
                        chat: bool, choices: int, usage: oa.UsageCount, include_usage: bool,
                        extras: Extras, created: int) -> AsyncIterator[dict]:
    """The stream's chunks in OpenAI's order: (chat: a role delta per choice,) text deltas as they come, each
    choice's finish reason, then the usage chunk if asked for. Token ids and logprobs ride on their piece's chunk
    (a piece with tokens and no text yet, e.g. half a character, still sends a chunk then); an echoed prompt and
    vLLM's prompt logprobs ride on a choice's first chunk."""
    offsets = CompletionOffsets(extras.shapes) if extras.logprobs and not chat else None
    echoed: set[int] = set()
    started: set[int] = set()
    if chat:
        for index in range(choices):
            chunk = oa.chat_chunk(request_id, model, created, index, {"role": "assistant", "content": ""}, None)
            if extras.with_token_ids:
                chunk["choices"][0]["prompt_token_ids"] = list(extras.prompt_ids[index])
            yield chunk
    try:
        async for item in _prepend(first, rest):
            piece, finish = item.piece, item.piece.finish_reason
            reason = finish.value if finish is not None else None
            carries = (piece.text or ((extras.with_token_ids or extras.logprobs) and piece.token_ids)
                       or (extras.prompt_logprobs and piece.prompt_logprobs is not None))  # (no text held them back)
            if chat:
                if carries:
                    chunk = oa.chat_chunk(request_id, model, created, item.index, {"content": piece.text}, None)
                    if extras.logprobs:
                        chunk["choices"][0]["logprobs"] = extras.shapes.chat(piece.logprobs)
                    yield _decorated(chunk, item, extras)
                if finish is not None:
                    yield oa.chat_chunk(request_id, model, created, item.index, {}, reason)
            else:
                echo = extras.echo[item.index] if extras.echo is not None and item.index not in echoed else None
                echoed.add(item.index)
                if carries or finish is not None or echo is not None:
                    text = (echo.text if echo else "") + piece.text
                    chunk = oa.completion_chunk(request_id, model, created, item.index, text, reason)
                    if offsets is not None:
                        chunk["choices"][0]["logprobs"] = offsets.shape(
                            item.index, piece.logprobs, piece.prompt_logprobs if echo else None,
                            echo.token_ids if echo else ())
                    if extras.with_token_ids and item.index not in started:
                        chunk["choices"][0]["prompt_token_ids"] = list(extras.prompt_ids[item.index])
                    started.add(item.index)
                    yield _decorated(chunk, item, extras)
            if finish is not None:
                count(usage, item)
    except (InvalidRequest, DuplicateRequest, Overloaded, Unavailable, WorkerError, TakenOver) as e:
        yield as_openai_error(e).body()
        return
    if include_usage:
        yield oa.usage_chunk(request_id, model, created, chat, usage.body())


def count(usage: oa.UsageCount, item: ChoicePiece) -> None:
    """A choice's last piece: its tokens (and its prompt's cached ones) join the usage."""
    timings = item.piece.timings
    usage.finished(item.index, item.piece.completion_tokens, timings.cached_tokens if timings is not None else 0)


def as_openai_error(error: Exception) -> oa.OpenAIError:
    message = str(error)
    if isinstance(error, InvalidRequest):  # named as in the gRPC request: sampling.max_tokens is max_tokens here
        message = message.removeprefix("sampling.")
        field = message.split(":", 1)[0] if ":" in message else None
        return oa.OpenAIError(400, message, param=field)
    if isinstance(error, DuplicateRequest):
        return oa.OpenAIError(409, message, param=REQUEST_ID_HEADER, code="duplicate_request_id")
    if isinstance(error, Overloaded):
        return oa.OpenAIError(429, message, kind="overloaded_error", code="queue_full")
    if isinstance(error, Unavailable):
        return oa.OpenAIError(503, message, kind="service_unavailable_error")
    if isinstance(error, TakenOver):
        return oa.OpenAIError(409, message, kind="conflict_error", code="taken_over")
    return oa.OpenAIError(500, message, kind="internal_error")


def _decorated(chunk: dict, item: ChoicePiece, extras: Extras) -> dict:
    """The chunk with its piece's token ids and (on a choice's first) vLLM's prompt logprobs, when asked for."""
    choice = chunk["choices"][0]
    if extras.with_token_ids:
        choice["token_ids"] = list(item.piece.token_ids)
    if extras.prompt_logprobs and item.piece.prompt_logprobs is not None:
        choice["prompt_logprobs"] = extras.shapes.prompt(item.piece.prompt_logprobs)
    return chunk


async def _prepend(first: ChoicePiece, rest: AsyncIterator[ChoicePiece]) -> AsyncIterator[ChoicePiece]:
    yield first
    async for item in rest:
        yield item
