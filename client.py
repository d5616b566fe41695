"""A small gRPC client for a pdserve router, synchronous (`SyncClient`) or asyncio (`Client`).

    with SyncClient("127.0.0.1:50051") as client:
        for response in client.stream("Hello", SamplingParams(max_tokens=32, temperature=0)):
            print(response.text, end="")
        result = client.generate(Prompt(messages=(Message("user", "Hi"),)))  # the whole output at once
        client.scale(decode=2)

    async with Client("127.0.0.1:50051") as client:
        async for response in client.stream("Hello", SamplingParams(max_tokens=32, temperature=0)):
            print(response.text, end="")
        result = await client.generate("Hello")

A prompt is a `Prompt` or a `str` (its text); `sampling` defaults to `SamplingParams()`. Both clients take the same
arguments: `timeout_s`, `token` (sent as `authorization: Bearer <token>`; default $PDSERVE_TOKEN),
`tls_root_certs`, `retries`, `backoff_s` and `reconnect_s`. The address may name several routers of one cluster
("host:port,host:port"): calls go to the first, and move on to the next when one does not answer.

Request ids: a request without one gets `req-<uuid4 hex>` from the client, so that a retry carries the same id (a
retry that reaches a router still running the first attempt gets ALREADY_EXISTS instead of running it twice).

Retries: a call that fails with UNAVAILABLE (and no other code) is made again, up to `retries` times (default 3),
after `backoff_s` seconds (default 0.2), doubling each time up to 2 s, on the next router given. `cancel()` on a
stream stops its retries too. Drain is never retried (a replayed drain could stop or replace a second time);
Status, Health and Scale (which sets target sizes) are.

Streams that break: once a router has taken a request (its stream's initial metadata says so) or sent some of it,
a stream that breaks with UNAVAILABLE (its router was killed, restarted, cut off) reconnects, to the same router or
the next one given, for up to `reconnect_s` (default 30 s) after it last made progress. The request is sent again
with the same id and `resume` (the tokens received so far): the router takes it over from the worker still running
it, or resumes it from those tokens, and the stream goes on. Every token arrives exactly once.

Timeouts: `timeout_s` is one deadline for a whole Generate call, its retries and backoff included (None: none).
Each attempt gets the time left; a backoff that would end past the deadline is not taken, and the last error is
raised. The admin calls work the same way: Status and Health with `timeout_s` or 10 s; Scale and Drain wait for
workers to drain or start, so they take their own `timeout_s` argument, 600 s by default.

Errors: a failed call raises `grpc.RpcError` (`grpc.aio.AioRpcError` from `Client`) as gRPC raised it; `.code()`
is INVALID_ARGUMENT (a bad request), ALREADY_EXISTS (that request id is running), RESOURCE_EXHAUSTED (the router's
queue is full), UNAUTHENTICATED (token), UNAVAILABLE (no worker, or no router, after the retries), DEADLINE_EXCEEDED
(`timeout_s`), CANCELLED or INTERNAL; Scale and Drain also NOT_FOUND (no such worker), FAILED_PRECONDITION or
UNIMPLEMENTED (the router does not manage its workers).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc

from pdserve.engine.request import Prompt
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.structured_output import GuideKind, StructuredOutput
from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc

AUTHORIZATION = "authorization"
ACCEPTED = "pdserve-accepted"
"""The initial metadata a router sends once it has taken a request (`router.server`)."""
FINISH_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}
RETRIES = 3
BACKOFF_S = 0.2
MAX_BACKOFF_S = 2.0
RECONNECT_S = 30.0
STATUS_TIMEOUT_S = 10.0
ADMIN_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Completion:
    request_id: str
    prompt_tokens: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    timings: pb.Timings


def build_request(prompt: Prompt | str, sampling: SamplingParams | None = None,
                  request_id: str = "") -> pb.GenerateRequest:
    prompt = Prompt(text=prompt) if isinstance(prompt, str) else prompt
    sampling = sampling or SamplingParams()
    s = pb.SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k, stop=list(sampling.stop), stop_token_ids=list(sampling.stop_token_ids),
                          ignore_eos=sampling.ignore_eos, presence_penalty=sampling.presence_penalty,
                          frequency_penalty=sampling.frequency_penalty,
                          repetition_penalty=sampling.repetition_penalty, min_tokens=sampling.min_tokens,
                          min_p=sampling.min_p, logit_bias=dict(sampling.logit_bias),
                          allowed_token_ids=list(sampling.allowed_token_ids))
    if sampling.logprobs is not None:
        s.logprobs = sampling.logprobs
    if sampling.prompt_logprobs is not None:
        s.prompt_logprobs = sampling.prompt_logprobs
    if sampling.seed is not None:
        s.seed = sampling.seed
    if sampling.structured_output is not None:
        s.structured_output.CopyFrom(structured_output_message(sampling.structured_output))
    request = pb.GenerateRequest(request_id=request_id, sampling=s)
    if prompt.text is not None:
        request.text = prompt.text
    elif prompt.messages is not None:
        request.messages.messages.extend(pb.ChatMessage(role=m.role, content=m.content) for m in prompt.messages)
    else:
        request.token_ids.ids.extend(prompt.token_ids)
    return request


def structured_output_message(structured: StructuredOutput) -> pb.StructuredOutput:
    kind = structured.kind
    if kind is GuideKind.JSON_OBJECT:
        return pb.StructuredOutput(json_object=True)
    if kind is GuideKind.CHOICE:
        return pb.StructuredOutput(choice=pb.Choices(choices=structured.choices))
    field = {GuideKind.JSON: "json_schema", GuideKind.REGEX: "regex", GuideKind.GRAMMAR: "grammar"}[kind]
    return pb.StructuredOutput(**{field: structured.spec})


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def resumed(request: pb.GenerateRequest, token_ids: list[int]) -> pb.GenerateRequest:
    """`request` again, for a stream that broke after `token_ids` arrived."""
    again = pb.GenerateRequest()
    again.CopyFrom(request)
    again.resume.CopyFrom(pb.Resume(tokens_received=len(token_ids), token_ids=token_ids))
    return again


class _Attempts:
    """One call's retry budget and deadline."""

    def __init__(self, retries: int, backoff_s: float, timeout_s: float | None) -> None:
        self.left = retries
        self.first_delay_s = backoff_s
        self.delay_s = backoff_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def timeout(self) -> float | None:
        """The next attempt's gRPC timeout: the time left."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def backoff(self, error: grpc.RpcError, retryable: bool = True) -> float | None:
        """Seconds to wait before trying again after `error`, or None: raise it."""
        if not retryable or self.left <= 0 or error.code() is not grpc.StatusCode.UNAVAILABLE:
            return None
        delay = self._delay()
        if delay is not None:
            self.left -= 1
        return delay

    def reconnect(self, error: grpc.RpcError, until: float) -> float | None:
        """Like `backoff`, for a stream whose request is under way: retried until `until` (not by count), and on
        ALREADY_EXISTS too (the router it reconnects to may not have seen its old stream break yet)."""
        if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ALREADY_EXISTS):
            return None
        if time.monotonic() + self.delay_s > until:
            return None
        return self._delay()

    def progressed(self) -> None:
        """A response arrived: the next break starts backing off from the first delay again."""
        self.delay_s = self.first_delay_s

    def _delay(self) -> float | None:
        delay = self.delay_s
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        self.delay_s = min(2 * self.delay_s, MAX_BACKOFF_S)
        return delay


class _Base:
    _grpc = grpc  # the module whose channels this client uses

    def __init__(self, address: str | list[str], timeout_s: float | None = None, token: str | None = None,
                 tls_root_certs: bytes | None = None, retries: int = RETRIES, backoff_s: float = BACKOFF_S,
                 reconnect_s: float = RECONNECT_S) -> None:
        """`address`: one router, or several of one cluster (a list, or comma-separated). `token`: the routers'
        bearer token (default: $PDSERVE_TOKEN, if set). `tls_root_certs`: PEM certificates to trust; given, the
        channels are TLS."""
        self.addresses = [a.strip() for a in address.split(",")] if isinstance(address, str) else list(address)
        if not self.addresses or not all(self.addresses):
            raise ValueError(f"address: expected host:port (or several, comma-separated), got {address!r}")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.reconnect_s = reconnect_s
        token = token if token is not None else os.environ.get("PDSERVE_TOKEN") or None
        self.metadata = ((AUTHORIZATION, f"Bearer {token}"),) if token else None
        self._credentials = grpc.ssl_channel_credentials(tls_root_certs) if tls_root_certs is not None else None
        self._channels = [self._channel(a) for a in self.addresses]
        self._current = 0

    @property
    def address(self) -> str:
        """The router calls go to now."""
        return self.addresses[self._current]

    @property
    def channel(self):
        return self._channels[self._current]

    @property
    def generation(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(self.channel)

    @property
    def admin(self) -> pb_grpc.AdminStub:
        return pb_grpc.AdminStub(self.channel)

    def _channel(self, address: str):
        if self._credentials is not None:
            return self._grpc.secure_channel(address, self._credentials)
        return self._grpc.insecure_channel(address)

    def _next_router(self) -> None:
        """Calls go to the next router given from now on (one router: the same one)."""
        self._current = (self._current + 1) % len(self.addresses)

    def _attempts(self, timeout_s: float | None, retries: int | None = None) -> _Attempts:
        return _Attempts(self.retries if retries is None else retries, self.backoff_s, timeout_s)

    def _start(self, request: pb.GenerateRequest, attempts: _Attempts):
        return self.generation.Generate(request, timeout=attempts.timeout(), metadata=self.metadata)


class Client(_Base):
    """The asyncio client; create and use it inside a running event loop."""

    _grpc = grpc.aio

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    def stream(self, prompt: Prompt | str, sampling: SamplingParams | None = None,
               request_id: str = "") -> "AsyncStream":
        """The response stream, already sent; `cancel()` it (or drop it) to cancel the request."""
        return AsyncStream(self, build_request(prompt, sampling, request_id or new_request_id()))

    async def generate(self, prompt: Prompt | str, sampling: SamplingParams | None = None,
                       request_id: str = "") -> Completion:
        return _completion([response async for response in self.stream(prompt, sampling, request_id)])

    async def status(self) -> pb.StatusResponse:
        return await self._unary(lambda admin: admin.Status, pb.StatusRequest(), self.timeout_s or STATUS_TIMEOUT_S)

    async def health(self) -> pb.HealthResponse:
        return await self._unary(lambda admin: admin.Health, pb.HealthRequest(), self.timeout_s or STATUS_TIMEOUT_S)

    async def scale(self, prefill: int | None = None, decode: int | None = None, colocated: int | None = None,
                    timeout_s: float | None = ADMIN_TIMEOUT_S) -> pb.ScaleResponse:
        """Start or stop workers until each pool given has that many; returns when done."""
        request = pb.ScaleRequest(prefill=prefill, decode=decode, colocated=colocated)
        return await self._unary(lambda admin: admin.Scale, request, timeout_s)

    async def drain(self, worker_id: str, replace: bool = False,
                    timeout_s: float | None = ADMIN_TIMEOUT_S) -> pb.DrainResponse:
        """Stop `worker_id` once its running requests finish (and start a fresh one if `replace`); not retried."""
        request = pb.DrainRequest(worker_id=worker_id, replace=replace)
        return await self._unary(lambda admin: admin.Drain, request, timeout_s, retries=0)

    async def _unary(self, method, request, timeout_s: float | None, retries: int | None = None):
        """`method(admin stub)` called with `request`; retried (on the next router) as the module says."""
        attempts = self._attempts(timeout_s, retries)
        while True:
            try:
                return await method(self.admin)(request, timeout=attempts.timeout(), metadata=self.metadata)
            except grpc.aio.AioRpcError as e:
                if (delay := attempts.backoff(e)) is None:
                    raise
                self._next_router()
                await asyncio.sleep(delay)


class SyncClient(_Base):
    """The synchronous client; its methods block the calling thread."""

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def stream(self, prompt: Prompt | str, sampling: SamplingParams | None = None,
               request_id: str = "") -> "SyncStream":
        """An iterator of the responses, already sent; `cancel()` it to cancel the request."""
        return SyncStream(self, build_request(prompt, sampling, request_id or new_request_id()))

    def generate(self, prompt: Prompt | str, sampling: SamplingParams | None = None,
                 request_id: str = "") -> Completion:
        return _completion(list(self.stream(prompt, sampling, request_id)))

    def status(self) -> pb.StatusResponse:
        return self._unary(lambda admin: admin.Status, pb.StatusRequest(), self.timeout_s or STATUS_TIMEOUT_S)

    def health(self) -> pb.HealthResponse:
        return self._unary(lambda admin: admin.Health, pb.HealthRequest(), self.timeout_s or STATUS_TIMEOUT_S)

    def scale(self, prefill: int | None = None, decode: int | None = None, colocated: int | None = None,
              timeout_s: float | None = ADMIN_TIMEOUT_S) -> pb.ScaleResponse:
        """Start or stop workers until each pool given has that many; returns when done."""
        request = pb.ScaleRequest(prefill=prefill, decode=decode, colocated=colocated)
        return self._unary(lambda admin: admin.Scale, request, timeout_s)

    def drain(self, worker_id: str, replace: bool = False,
              timeout_s: float | None = ADMIN_TIMEOUT_S) -> pb.DrainResponse:
        """Stop `worker_id` once its running requests finish (and start a fresh one if `replace`); not retried."""
        return self._unary(lambda admin: admin.Drain, pb.DrainRequest(worker_id=worker_id, replace=replace), timeout_s,
                           retries=0)

    def _unary(self, method, request, timeout_s: float | None, retries: int | None = None):
        """`method(admin stub)` called with `request`; retried (on the next router) as the module says."""
        attempts = self._attempts(timeout_s, retries)
        while True:
            try:
                return method(self.admin)(request, timeout=attempts.timeout(), metadata=self.metadata)
            except grpc.RpcError as e:
                if (delay := attempts.backoff(e)) is None:
                    raise
                self._next_router()
                time.sleep(delay)


class _Stream:
    """One Generate request over one or more attempts; attributes it lacks are the current attempt's (a grpc call)."""

    def __init__(self, client: _Base, request: pb.GenerateRequest) -> None:
        self.request_id = request.request_id
        self.token_ids: list[int] = []
        """Every token received so far (what a reconnect resumes from)."""
        self._client, self._request = client, request
        self._attempts = client._attempts(client.timeout_s)
        self._received = self._cancelled = False
        self._under_way = False
        """A router took the request: a new attempt resumes it instead of starting it again."""
        self._reconnect_until: float | None = None
        self._call = client._start(request, self._attempts)

    def cancel(self) -> bool:
        self._cancelled = True
        return self._call.cancel()

    def _retry_after(self, error: grpc.RpcError, accepted: bool) -> float | None:
        """The backoff before the next attempt, or None: raise `error`. `accepted`: the failed attempt's router had
        taken the request."""
        if self._cancelled:
            return None
        if not (accepted or self._received or self._under_way):
            return self._attempts.backoff(error)
        self._under_way = True
        if self._reconnect_until is None:
            self._reconnect_until = time.monotonic() + self._client.reconnect_s
        return self._attempts.reconnect(error, self._reconnect_until)

    def _restart(self, error: grpc.RpcError) -> None:
        if self._cancelled:  # during the backoff
            raise error
        self._client._next_router()
        request = resumed(self._request, self.token_ids) if self._under_way else self._request
        self._call = self._client._start(request, self._attempts)

    def _got(self, response: pb.GenerateResponse) -> pb.GenerateResponse:
        self._received = True
        self.token_ids.extend(response.token_ids)
        self._reconnect_until = None
        self._attempts.progressed()
        return response

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._call, name)


class AsyncStream(_Stream):
    """Generate's responses, retried (or resumed) on UNAVAILABLE as the module says. Use it as a grpc.aio call:
    `async for`, `await read()` (grpc.aio.EOF at the end), `cancel()`, `await code()`..."""

    async def read(self):
        while True:
            try:
                response = await self._call.read()
            except grpc.aio.AioRpcError as e:
                accepted = _accepted(await self._call.initial_metadata())
                if (delay := self._retry_after(e, accepted)) is None:
                    raise
                await asyncio.sleep(delay)
                self._restart(e)
                continue
            return response if response is grpc.aio.EOF else self._got(response)

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[pb.GenerateResponse]:
        while (response := await self.read()) is not grpc.aio.EOF:
            yield response


class SyncStream(_Stream):
    """Generate's responses, retried (or resumed) on UNAVAILABLE as the module says: an iterator, with the
    `cancel()`, `code()`... of a grpc call."""

    def __iter__(self) -> Iterator[pb.GenerateResponse]:
        return self

    def __next__(self) -> pb.GenerateResponse:
        while True:
            try:
                response = next(self._call)
            except grpc.RpcError as e:
                if (delay := self._retry_after(e, _accepted(self._call.initial_metadata()))) is None:
                    raise
                time.sleep(delay)
                self._restart(e)
                continue
            return self._got(response)


def _accepted(metadata) -> bool:
    """A router's initial metadata says it took the request."""
    return any(key == ACCEPTED for key, _ in metadata or ())


def _completion(responses: list[pb.GenerateResponse]) -> Completion:
    last = responses[-1] if responses else pb.GenerateResponse()
    return Completion(last.request_id, last.prompt_tokens, tuple(t for r in responses for t in r.token_ids),
                      "".join(r.text for r in responses), FINISH_NAMES.get(last.finish_reason), last.timings)

