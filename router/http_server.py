"""The router's OpenAI-compatible HTTP API (FastAPI; `http_serving` runs it on uvicorn in the router's event loop).

    POST /v1/completions          text or token-id prompts (a list of them too), n choices each
    POST /v1/chat/completions     the model's chat template; `stream: true` answers server-sent events,
                                  `stream_options.include_usage` adds a last chunk with the token counts
    GET  /v1/models               the served model
    GET  /v1/models/{model}       the served model by name (404 in OpenAI's shape for any other)
    GET  /health                  200 when the cluster can serve, 503 with the reason otherwise
    GET  /metrics                 the router's Prometheus metrics (the same as on its metrics port)
    GET  /metrics/workers         every worker's metrics, gathered over Ray (`worker_scrape`)

Life of a request: the body is parsed (a wrong type is a 400 naming the field) -> OpenAI's fields become one
`GenerateRequest` per choice (`openai_protocol`) -> each is checked by the `RequestBuilder`, as a gRPC request is ->
the orchestrator runs the choices side by side -> one JSON body, or SSE chunks as the tokens come. With a bearer
token configured (`router.token_file`), every /v1 call needs `Authorization: Bearer <token>` (401 otherwise);
/health and /metrics stay open for probes and scrapers. Errors use OpenAI's shape: 400 bad request, 401, 404
unknown model, 409 a request id (header X-Request-Id) already running, 429 the admission queue is full, 503 no
worker, 500 a worker error. An error after the stream has started comes as a `data: {"error": ...}` event. A client
that disconnects cancels its requests; the workers free their KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from pdserve.access import Access
from pdserve.engine.logprobs import TokenLogprobs
from pdserve.router import openai_protocol as oa
from pdserve.router.admin import unhealthy_reason
from pdserve.router.body_limit import BodyLimit
from pdserve.router.choices import ChoicePiece, merged
from pdserve.router.errors import DuplicateRequest, Overloaded, TakenOver, Unavailable, WorkerError
from pdserve.router.openai_logprobs import CompletionOffsets, LogprobShapes
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.request_builder import MAX_REQUEST_ID_LEN, InvalidRequest, RequestBuilder, ValidRequest
from pdserve.router.worker_scrape import scrape_workers

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
DISCONNECT_POLL_S = 0.25
"""How often a request that streams nothing yet checks that its client is still there."""
MAX_BODY_BYTES = 10 * 2**20
"""router.max_body_bytes's default."""
CLIENT_CLOSED = 499
"""The status logged for a request whose client left (nginx's convention; the client never sees it)."""
T = TypeVar("T")


class OpenAIServer:
    def __init__(self, builder: RequestBuilder, orchestrator: Orchestrator, model_name: str,
                 access: Access, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.builder = builder
        self.max_body_bytes = max_body_bytes
        self.orchestrator = orchestrator
        self.model_name = model_name
        self._expected = f"Bearer {access.token}".encode() if access.token else None
        self.logprob_shapes = LogprobShapes(getattr(builder, "tokenizer", None))
        self.created = int(time.time())

    def app(self) -> FastAPI:
        app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(oa.OpenAIError, _openai_error)
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_exception_handler(HTTPException, _http_error)
        app.add_middleware(BodyLimit, max_bytes=self.max_body_bytes)
        if self._expected is not None:  # checked before the body is read: no token, no validation answers
            app.add_middleware(_BearerToken, expected=self._expected)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.get("/v1/models")(self.models)
        app.get("/v1/models/{model:path}")(self.model)
        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics)
        app.get("/metrics/workers")(self.worker_metrics)
        return app

    async def completions(self, body: oa.CompletionRequest, request: Request) -> Response:
        return await self._generate(body, request, chat=False)

    async def chat_completions(self, body: oa.ChatCompletionRequest, request: Request) -> Response:
        return await self._generate(body, request, chat=True)

    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model: str) -> dict:
        if model != self.model_name:
            raise oa.OpenAIError(404, f"model: the model {model!r} does not exist (served: {self.model_name!r})",
                                 param="model", code="model_not_found")
        return self._model_card()

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "pdserve",
                "max_model_len": self.builder.context_length}

    async def health(self) -> JSONResponse:
        reason = unhealthy_reason(self.orchestrator)
        return JSONResponse({"status": "unavailable", "detail": reason} if reason else {"status": "ok"},
                            status_code=503 if reason else 200)

    async def metrics(self) -> Response:
        return Response(generate_latest(self.orchestrator.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def worker_metrics(self) -> Response:
        handles = {worker_id: m.handle for worker_id, m in self.orchestrator.membership.members.items()}
        return Response(await scrape_workers(handles), media_type=CONTENT_TYPE_LATEST)

    # ---- generation ----------------------------------------------------------------------------------------------
    async def _generate(self, body: oa.CompletionRequest | oa.ChatCompletionRequest, request: Request,
                        chat: bool) -> Response:
        if body.model not in (None, self.model_name):
            raise oa.OpenAIError(404, f"model: the model {body.model!r} does not exist (served: {self.model_name!r})",
                                 param="model", code="model_not_found")
        request_id = request.headers.get(REQUEST_ID_HEADER) or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        valid = await self._build(body, chat, request_id)
        usage = oa.UsageCount(sum(len(v.token_ids) for v in valid[::body.n]), body.n)  # each prompt once
        stream = merged(self.orchestrator, valid)
        try:
            # an error before the first token is an HTTP status, not a stream event
            first = await _unless_disconnected(request, anext(stream))
            shapes = self.logprob_shapes if body.logprobs_asked is not None else None
            if body.stream:
                chunks = _chunks(first, stream, request_id, self.model_name, chat, len(valid), usage,
                                 body.include_usage, body.return_token_ids, shapes)
                return StreamingResponse(_sse(chunks), media_type="text/event-stream",
                                         headers={REQUEST_ID_HEADER: request_id})
            whole = await _unless_disconnected(request, _whole(first, stream, request_id, self.model_name, chat,
                                                               len(valid), usage, body.return_token_ids, shapes))
        except (InvalidRequest, DuplicateRequest, Overloaded, Unavailable, WorkerError, TakenOver) as e:
            await stream.aclose()
            self._count_refusal(e)
            raise _as_openai_error(e) from e
        except ClientGone:
            await stream.aclose()  # cancels the choices: their workers free the KV blocks
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(whole, headers={REQUEST_ID_HEADER: request_id})

    async def _build(self, body: oa.CompletionRequest | oa.ChatCompletionRequest, chat: bool,
                     request_id: str) -> list[ValidRequest]:
        """Each choice checked by the RequestBuilder (each distinct prompt tokenized once), with its request id."""
        if len(request_id) + 4 > MAX_REQUEST_ID_LEN:
            raise oa.OpenAIError(400, f"X-Request-Id: longer than {MAX_REQUEST_ID_LEN - 4} characters",
                                 param=REQUEST_ID_HEADER)
        requests = body.generate_requests()
        open_ended = chat and not body.max_tokens_given  # chat runs to the context's end unless told otherwise
        built: dict[bytes, ValidRequest] = {}
        valid = []
        for index, generate in enumerate(requests):
            if open_ended:  # max_tokens is the room left in the context, known once the prompt is tokenized
                generate.sampling.max_tokens = max(1, generate.sampling.min_tokens)
            key = generate.SerializeToString(deterministic=True)
            if key not in built:
                try:
                    built[key] = await asyncio.to_thread(self.builder.build, generate)
                except InvalidRequest as e:
                    self.orchestrator.metrics.failed(e)
                    raise _as_openai_error(e) from e
            one = built[key]
            if open_ended:
                room = max(1, self.builder.context_length - len(one.token_ids))
                one = dataclasses.replace(one, sampling=dataclasses.replace(one.sampling, max_tokens=room))
            valid.append(dataclasses.replace(one, request_id=request_id if len(requests) == 1 else
                                             f"{request_id}-{index}"))
        return valid

    def _count_refusal(self, error: Exception) -> None:
        if isinstance(error, (DuplicateRequest, Overloaded)):  # raised before the orchestrator counts the request
            self.orchestrator.metrics.failed(error)


async def _whole(first: ChoicePiece, rest: AsyncIterator[ChoicePiece], request_id: str, model: str, chat: bool,
                 choices: int, usage: oa.UsageCount, with_token_ids: bool, shapes: LogprobShapes | None) -> dict:
    """`shapes`: each choice's logprobs in OpenAI's shape (None: not asked for)."""
    texts: list[list[str]] = [[] for _ in range(choices)]
    token_ids: list[list[int]] = [[] for _ in range(choices)]
    logprobs: list[list[TokenLogprobs]] = [[] for _ in range(choices)]
    finish: list[str | None] = [None] * choices
    for item in [first] + [item async for item in rest]:
        texts[item.index].append(item.piece.text)
        token_ids[item.index].extend(item.piece.token_ids)
        logprobs[item.index].extend(item.piece.logprobs)
        if item.piece.finish_reason is not None:
            finish[item.index] = item.piece.finish_reason.value
            _count(usage, item)
    build = oa.chat_body if chat else oa.completion_body
    body = build(request_id, model, ["".join(t) for t in texts], finish, usage.body())
    if with_token_ids:
        for choice, ids in zip(body["choices"], token_ids):
            choice["token_ids"] = ids
    if shapes is not None:
        for choice, found in zip(body["choices"], logprobs):
            choice["logprobs"] = shapes.chat(found) if chat else shapes.completion(found, 0)[0]
    return body


async def _chunks(first: ChoicePiece, rest: AsyncIterator[ChoicePiece], request_id: str, model: str, chat: bool,
                  choices: int, usage: oa.UsageCount, include_usage: bool,
                  with_token_ids: bool, shapes: LogprobShapes | None) -> AsyncIterator[dict]:
    """The stream's chunks in OpenAI's order: (chat: a role delta per choice,) text deltas as they come, each
    choice's finish reason, then the usage chunk if asked for. With `with_token_ids` a piece's token ids ride on
    its chunk, and with `shapes` its logprobs (a piece with tokens and no text yet, e.g. half a character, still
    sends a chunk then)."""
    created = int(time.time())
    offsets = CompletionOffsets(shapes) if shapes is not None and not chat else None
    if chat:
        for index in range(choices):
            yield oa.chat_chunk(request_id, model, created, index, {"role": "assistant", "content": ""}, None)
    try:
        async for item in _prepend(first, rest):
            piece, finish = item.piece, item.piece.finish_reason
            reason = finish.value if finish is not None else None
            carries = piece.text or ((with_token_ids or shapes is not None) and piece.token_ids)
            if chat:
                if carries:
                    chunk = oa.chat_chunk(request_id, model, created, item.index, {"content": piece.text}, None)
                    if shapes is not None:
                        chunk["choices"][0]["logprobs"] = shapes.chat(piece.logprobs)
                    yield _with_ids(chunk, piece.token_ids) if with_token_ids else chunk
                if finish is not None:
                    yield oa.chat_chunk(request_id, model, created, item.index, {}, reason)
            elif carries or finish is not None:
                chunk = oa.completion_chunk(request_id, model, created, item.index, piece.text, reason)
                if offsets is not None:
                    chunk["choices"][0]["logprobs"] = offsets.shape(item.index, piece.logprobs)
                yield _with_ids(chunk, piece.token_ids) if with_token_ids else chunk
            if finish is not None:
                _count(usage, item)
    except (InvalidRequest, DuplicateRequest, Overloaded, Unavailable, WorkerError, TakenOver) as e:
        yield _as_openai_error(e).body()
        return
    if include_usage:
        yield oa.usage_chunk(request_id, model, created, chat, usage.body())


def _count(usage: oa.UsageCount, item: ChoicePiece) -> None:
    """A choice's last piece: its tokens (and its prompt's cached ones) join the usage."""
    timings = item.piece.timings
    usage.finished(item.index, item.piece.completion_tokens, timings.cached_tokens if timings is not None else 0)


class _BearerToken:
    """ASGI middleware: every /v1 call needs `Authorization: Bearer <token>` (/health and /metrics stay open). Plain
    ASGI, not BaseHTTPMiddleware, so a client's disconnect still reaches the handler."""

    def __init__(self, app, expected: bytes) -> None:
        self.app = app
        self.expected = expected

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                reason = "missing bearer token" if not given else "wrong bearer token"
                error = oa.OpenAIError(401, f"{reason} (send 'Authorization: Bearer <token>')",
                                       kind="authentication_error", code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ClientGone(Exception):
    """The HTTP client disconnected while its (non-streamed, or not yet started) request ran."""


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (with `work` cancelled) as soon as the client has disconnected."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _with_ids(chunk: dict, token_ids: tuple[int, ...]) -> dict:
    chunk["choices"][0]["token_ids"] = list(token_ids)
    return chunk


async def _prepend(first: ChoicePiece, rest: AsyncIterator[ChoicePiece]) -> AsyncIterator[ChoicePiece]:
    yield first
    async for item in rest:
        yield item


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
    yield b"data: [DONE]\n\n"


def _as_openai_error(error: Exception) -> oa.OpenAIError:
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


async def _openai_error(request: Request, error: oa.OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = _most_telling(error.errors())
    where = "" if first.get("type") == "json_invalid" else _field_path([p for p in first.get("loc", ()) if p != "body"])
    detail = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    message = f"{where}: {detail}" if where else f"body: {detail}"
    return JSONResponse(oa.OpenAIError(400, message, param=where or None).body(), status_code=400)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return JSONResponse(oa.OpenAIError(error.status_code, str(error.detail), kind=kind).body(),
                        status_code=error.status_code)


def _most_telling(errors: list[dict]) -> dict:
    """The first wrong field's error that says what is wrong with its value: a field whose type is a union gets one
    error per member type, and "not a valid string" says less about [5, 2**31] than its int member's range does."""
    field = tuple(errors[0].get("loc", ()))[:2]
    same = [e for e in errors if tuple(e.get("loc", ()))[:2] == field]
    return min(same, key=lambda e: (str(e.get("type", "")).endswith("_type"), -len(e.get("loc", ()))))


def _field_path(loc: list) -> str:
    """("messages", 0, "role") -> "messages[0].role"; the union member's type names pydantic adds are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part in ("str", "int", "list", "float", "bool"):  # e.g. list[int] in a union
            continue
        else:
            path += f".{part}" if path else part
    return path
