"""The router's OpenAI-compatible HTTP API (FastAPI; `http_serving` runs it on uvicorn in the router's event loop).

    POST /v1/completions          text or token-id prompts (a list of them too), n choices each
    POST /v1/chat/completions     the model's chat template; `stream: true` answers server-sent events,
                                  `stream_options.include_usage` adds a last chunk with the token counts
    GET  /v1/models               the served model
    GET  /v1/models/{model}       the served model by name (404 in OpenAI's shape for any other)
    GET  /health                  200 when the cluster can serve, 503 with the reason otherwise
    GET  /metrics                 the router's Prometheus metrics (the same as on its metrics port)
    GET  /metrics/workers         every worker's metrics, gathered over Ray (`worker_scrape`)
    /v1/files, /v1/batches        OpenAI's Files and Batch API (`batch_api`; run by `batch_runner`)

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
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from pdserve.access import Access
from pdserve.engine.request import BATCH_PRIORITY
from pdserve.router import openai_protocol as oa
from pdserve.router.admin import unhealthy_reason
from pdserve.router.batch_api import BatchAPI
from pdserve.router.body_limit import BodyLimit
from pdserve.router.choices import merged
from pdserve.router.errors import DuplicateRequest, Overloaded, TakenOver, Unavailable, WorkerError
from pdserve.router.openai_logprobs import LogprobShapes
from pdserve.router.openai_responses import (
    REQUEST_ID_HEADER,
    EchoedPrompt,
    Extras,
    as_openai_error,
    stream_chunks,
    whole_body,
)
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.request_builder import MAX_REQUEST_ID_LEN, InvalidRequest, RequestBuilder, ValidRequest
from pdserve.router.worker_scrape import scrape_workers

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
"""How often a request that streams nothing yet checks that its client is still there."""
MAX_BODY_BYTES = 10 * 2**20
"""router.max_body_bytes's default."""
CLIENT_CLOSED = 499
"""The status logged for a request whose client left (nginx's convention; the client never sees it)."""
T = TypeVar("T")


class OpenAIServer:
    def __init__(self, builder: RequestBuilder, orchestrator: Orchestrator, model_name: str,
                 access: Access, max_body_bytes: int = MAX_BODY_BYTES, batches: BatchAPI | None = None,
                 max_file_bytes: int | None = None) -> None:
        """`batches`: the Files and Batch API's routes (none without it)."""
        self.builder = builder
        self.max_body_bytes = max_body_bytes
        self.max_file_bytes = max_file_bytes
        self.batches = batches
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
        app.add_middleware(BodyLimit, max_bytes=self.max_body_bytes, file_max_bytes=self.max_file_bytes)
        if self._expected is not None:  # checked before the body is read: no token, no validation answers
            app.add_middleware(_BearerToken, expected=self._expected)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.get("/v1/models")(self.models)
        app.get("/v1/models/{model:path}")(self.model)
        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics)
        app.get("/metrics/workers")(self.worker_metrics)
        if self.batches is not None:
            self.batches.add_routes(app)
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
        self._check_model(body)
        request_id = request.headers.get(REQUEST_ID_HEADER) or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        valid = await self._build(body, chat, request_id)
        usage = oa.UsageCount(sum(len(v.token_ids) for v in valid[::body.n]), body.n)  # each prompt once
        stream = merged(self.orchestrator, valid)
        try:
            # an error before the first token is an HTTP status, not a stream event
            first = await _unless_disconnected(request, anext(stream))
            extras = self._extras(body, chat, valid)
            if body.stream:
                chunks = stream_chunks(first, stream, request_id, self.model_name, chat, len(valid), usage,
                                       body.include_usage, extras, int(time.time()))
                return StreamingResponse(_sse(chunks), media_type="text/event-stream",
                                         headers={REQUEST_ID_HEADER: request_id})
            whole = await _unless_disconnected(request, whole_body(first, stream, request_id, self.model_name,
                                                                   chat, len(valid), usage, extras))
        except (InvalidRequest, DuplicateRequest, Overloaded, Unavailable, WorkerError, TakenOver) as e:
            await stream.aclose()
            self._count_refusal(e)
            raise as_openai_error(e) from e
        except ClientGone:
            await stream.aclose()  # cancels the choices: their workers free the KV blocks
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(whole, headers={REQUEST_ID_HEADER: request_id})

    async def batch_answer(self, endpoint: str, body: dict, request_id: str) -> tuple[int, dict]:
        """A Batch API line answered whole, as its endpoint answers it: (HTTP status, body). Low priority unless
        the body sets `priority`."""
        chat = endpoint == "/v1/chat/completions"
        try:
            parsed = (oa.ChatCompletionRequest if chat else oa.CompletionRequest).model_validate(body)
            if parsed.stream:
                raise oa.OpenAIError(400, "stream: a batch's requests are answered whole", param="stream")
            if "priority" not in parsed.model_fields_set:
                parsed.priority = BATCH_PRIORITY
            return 200, await self._whole(parsed, chat, request_id)
        except ValidationError as e:
            return 400, validation_error(e.errors()).body()
        except oa.OpenAIError as e:
            return e.status, e.body()

    async def _whole(self, body: oa.CompletionRequest | oa.ChatCompletionRequest, chat: bool,
                     request_id: str) -> dict:
        self._check_model(body)
        valid = await self._build(body, chat, request_id)
        usage = oa.UsageCount(sum(len(v.token_ids) for v in valid[::body.n]), body.n)
        stream = merged(self.orchestrator, valid)
        try:
            first = await anext(stream)
            return await whole_body(first, stream, request_id, self.model_name, chat, len(valid), usage,
                                    self._extras(body, chat, valid))
        except (InvalidRequest, DuplicateRequest, Overloaded, Unavailable, WorkerError, TakenOver) as e:
            self._count_refusal(e)
            raise as_openai_error(e) from e
        finally:
            await stream.aclose()

    def _check_model(self, body: oa.CompletionRequest | oa.ChatCompletionRequest) -> None:
        if body.model not in (None, self.model_name):
            raise oa.OpenAIError(404, f"model: the model {body.model!r} does not exist (served: {self.model_name!r})",
                                 param="model", code="model_not_found")

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
                    raise as_openai_error(e) from e
            one = built[key]
            if open_ended:  # up to the context's end, or the end of a worker's KV cache if that comes first
                kv_room = self.orchestrator.placement.output_room(len(one.token_ids))
                room = max(1, min(self.builder.context_length - len(one.token_ids),
                                  kv_room if kv_room is not None else self.builder.context_length))
                if one.sampling.min_tokens > room:
                    error = InvalidRequest(f"min_tokens: {one.sampling.min_tokens} is more than the {room} tokens left "
                                           f"after the prompt ({len(one.token_ids)} tokens) in the context or a "
                                           "worker's KV cache")
                    self.orchestrator.metrics.failed(error)
                    raise as_openai_error(error)
                one = dataclasses.replace(one, sampling=dataclasses.replace(one.sampling, max_tokens=room))
            valid.append(dataclasses.replace(one, request_id=request_id if len(requests) == 1 else
                                             f"{request_id}-{index}"))
        return valid

    def _extras(self, body: oa.CompletionRequest | oa.ChatCompletionRequest, chat: bool,
                valid: list[ValidRequest]) -> Extras:
        echo = None
        if not chat and body.echo:  # each choice's prompt, as given (text) or decoded (token ids)
            prompts = body.prompt_texts(self.logprob_shapes.decode)
            echo = tuple(EchoedPrompt(prompts[i // body.n], v.token_ids) for i, v in enumerate(valid))
        return Extras(self.logprob_shapes, body.return_token_ids, body.logprobs_asked is not None,
                      body.prompt_logprobs is not None, echo, tuple(v.token_ids for v in valid))

    def _count_refusal(self, error: Exception) -> None:
        if isinstance(error, (DuplicateRequest, Overloaded)):  # raised before the orchestrator counts the request
            self.orchestrator.metrics.failed(error)


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


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
    yield b"data: [DONE]\n\n"


async def _openai_error(request: Request, error: oa.OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return JSONResponse(validation_error(error.errors()).body(), status_code=400)


def validation_error(errors: list[dict]) -> oa.OpenAIError:
    """pydantic's errors for a body as one 400 naming the first wrong field."""
    first = _most_telling(errors)
    where = "" if first.get("type") == "json_invalid" else _field_path([p for p in first.get("loc", ()) if p != "body"])
    detail = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    message = f"{where}: {detail}" if where else f"body: {detail}"
    return oa.OpenAIError(400, message, param=where or None)


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
