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
`tls_root_certs`, `retries` and `backoff_s`.

Request ids: a request without one gets `req-<uuid4 hex>` from the client, so that a retry carries the same id (a
retry that reaches a router still running the first attempt gets ALREADY_EXISTS instead of running it twice).

Retries: a call that fails with UNAVAILABLE (and no other code) is made again, up to `retries` times (default 3),
after `backoff_s` seconds (default 0.2), doubling each time up to 2 s. A stream is retried only until its first
response arrives: after that a retry would deliver its tokens again, so the UNAVAILABLE error is raised. `cancel()`
on a stream stops its retries too. Drain is never retried (a replayed drain could stop or replace a second time);
Status, Health and Scale (which sets target sizes) are.

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

from pdserve.cluster.state import ClusterState
from pdserve.engine.request import Prompt
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc

AUTHORIZATION = "authorization"
FINISH_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}
RETRIES = 3
BACKOFF_S = 0.2
MAX_BACKOFF_S = 2.0
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
                          ignore_eos=sampling.ignore_eos)
    if sampling.seed is not None:
        s.seed = sampling.seed
    request = pb.GenerateRequest(request_id=request_id, sampling=s)
    if prompt.text is not None:
        request.text = prompt.text
    elif prompt.messages is not None:
        request.messages.messages.extend(pb.ChatMessage(role=m.role, content=m.content) for m in prompt.messages)
    else:
        request.token_ids.ids.extend(prompt.token_ids)
    return request


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


class _Attempts:
    """One call's retry budget and deadline."""

    def __init__(self, retries: int, backoff_s: float, timeout_s: float | None) -> None:
        self.left = retries
        self.delay_s = backoff_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def timeout(self) -> float | None:
        """The next attempt's gRPC timeout: the time left."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def backoff(self, error: grpc.RpcError, retryable: bool = True) -> float | None:
        """Seconds to wait before trying again after `error`, or None: raise it."""
        if not retryable or self.left <= 0 or error.code() is not grpc.StatusCode.UNAVAILABLE:
            return None
        delay = self.delay_s
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        self.left -= 1
        self.delay_s = min(2 * self.delay_s, MAX_BACKOFF_S)
        return delay


class _Base:
    _grpc = grpc  # the module whose channels this client uses

    def __init__(self, address: str, timeout_s: float | None = None, token: str | None = None,
                 tls_root_certs: bytes | None = None, retries: int = RETRIES, backoff_s: float = BACKOFF_S) -> None:
        """`token`: the router's bearer token (default: $PDSERVE_TOKEN, if set). `tls_root_certs`: PEM certificates
        to trust; given, the channel is TLS."""
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        token = token if token is not None else os.environ.get("PDSERVE_TOKEN") or None
        self.metadata = ((AUTHORIZATION, f"Bearer {token}"),) if token else None
        if tls_root_certs is not None:
            self.channel = self._grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_root_certs))
        else:
            self.channel = self._grpc.insecure_channel(address)
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

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
        await self.channel.close()

    def stream(self, prompt: Prompt | str, sampling: SamplingParams | None = None,
               request_id: str = "") -> "AsyncStream":
        """The response stream, already sent; `cancel()` it (or drop it) to cancel the request."""
        return AsyncStream(self, build_request(prompt, sampling, request_id or new_request_id()))

    async def generate(self, prompt: Prompt | str, sampling: SamplingParams | None = None,
                       request_id: str = "") -> Completion:
        return _completion([response async for response in self.stream(prompt, sampling, request_id)])

    async def status(self) -> pb.StatusResponse:
        return await self._unary(self.admin.Status, pb.StatusRequest(), self.timeout_s or STATUS_TIMEOUT_S)

    async def health(self) -> pb.HealthResponse:
        return await self._unary(self.admin.Health, pb.HealthRequest(), self.timeout_s or STATUS_TIMEOUT_S)

    async def scale(self, prefill: int | None = None, decode: int | None = None, colocated: int | None = None,
                    timeout_s: float | None = ADMIN_TIMEOUT_S) -> pb.ScaleResponse:
        """Start or stop workers until each pool given has that many; returns when done."""
        request = pb.ScaleRequest(prefill=prefill, decode=decode, colocated=colocated)
        return await self._unary(self.admin.Scale, request, timeout_s)

    async def drain(self, worker_id: str, replace: bool = False,
                    timeout_s: float | None = ADMIN_TIMEOUT_S) -> pb.DrainResponse:
        """Stop `worker_id` once its running requests finish (and start a fresh one if `replace`); not retried."""
        return await self._unary(self.admin.Drain, pb.DrainRequest(worker_id=worker_id, replace=replace), timeout_s,
                                 retries=0)

    async def _unary(self, method, request, timeout_s: float | None, retries: int | None = None):
        attempts = self._attempts(timeout_s, retries)
        while True:
            try:
                return await method(request, timeout=attempts.timeout(), metadata=self.metadata)
            except grpc.aio.AioRpcError as e:
                if (delay := attempts.backoff(e)) is None:
                    raise
                await asyncio.sleep(delay)


class SyncClient(_Base):
    """The synchronous client; its methods block the calling thread."""

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def stream(self, prompt: Prompt | str, sampling: SamplingParams | None = None,
               request_id: str = "") -> "SyncStream":
        """An iterator of the responses, already sent; `cancel()` it to cancel the request."""
        return SyncStream(self, build_request(prompt, sampling, request_id or new_request_id()))

    def generate(self, prompt: Prompt | str, sampling: SamplingParams | None = None,
                 request_id: str = "") -> Completion:
        return _completion(list(self.stream(prompt, sampling, request_id)))

    def status(self) -> pb.StatusResponse:
        return self._unary(self.admin.Status, pb.StatusRequest(), self.timeout_s or STATUS_TIMEOUT_S)

    def health(self) -> pb.HealthResponse:
        return self._unary(self.admin.Health, pb.HealthRequest(), self.timeout_s or STATUS_TIMEOUT_S)

    def scale(self, prefill: int | None = None, decode: int | None = None, colocated: int | None = None,
              timeout_s: float | None = ADMIN_TIMEOUT_S) -> pb.ScaleResponse:
        """Start or stop workers until each pool given has that many; returns when done."""
        return self._unary(self.admin.Scale, pb.ScaleRequest(prefill=prefill, decode=decode, colocated=colocated),
                           timeout_s)

    def drain(self, worker_id: str, replace: bool = False,
              timeout_s: float | None = ADMIN_TIMEOUT_S) -> pb.DrainResponse:
        """Stop `worker_id` once its running requests finish (and start a fresh one if `replace`); not retried."""
        return self._unary(self.admin.Drain, pb.DrainRequest(worker_id=worker_id, replace=replace), timeout_s,
                           retries=0)

    def _unary(self, method, request, timeout_s: float | None, retries: int | None = None):
        attempts = self._attempts(timeout_s, retries)
        while True:
            try:
                return method(request, timeout=attempts.timeout(), metadata=self.metadata)
            except grpc.RpcError as e:
                if (delay := attempts.backoff(e)) is None:
                    raise
                time.sleep(delay)


class _Stream:
    """One Generate request over one or more attempts; attributes it lacks are the current attempt's (a grpc call)."""

    def __init__(self, client: _Base, request: pb.GenerateRequest) -> None:
        self.request_id = request.request_id
        self._client, self._request = client, request
        self._attempts = client._attempts(client.timeout_s)
        self._received = self._cancelled = False
        self._call = client._start(request, self._attempts)

    def cancel(self) -> bool:
        self._cancelled = True
        return self._call.cancel()

    def _retry_after(self, error: grpc.RpcError) -> float | None:
        """The backoff before the next attempt, or None: raise `error`."""
        return self._attempts.backoff(error, retryable=not (self._received or self._cancelled))

    def _restart(self, error: grpc.RpcError) -> None:
        if self._cancelled:  # during the backoff
            raise error
        self._call = self._client._start(self._request, self._attempts)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._call, name)


class AsyncStream(_Stream):
    """Generate's responses, retried on UNAVAILABLE until the first one arrives. Use it as a grpc.aio call:
    `async for`, `await read()` (grpc.aio.EOF at the end), `cancel()`, `await code()`..."""

    async def read(self):
        while True:
            try:
                response = await self._call.read()
            except grpc.aio.AioRpcError as e:
                if (delay := self._retry_after(e)) is None:
                    raise
                await asyncio.sleep(delay)
                self._restart(e)
                continue
            self._received = True
            return response

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[pb.GenerateResponse]:
        while (response := await self.read()) is not grpc.aio.EOF:
            yield response


class SyncStream(_Stream):
    """Generate's responses, retried on UNAVAILABLE until the first one arrives: an iterator, with the `cancel()`,
    `code()`... of a grpc call."""

    def __iter__(self) -> Iterator[pb.GenerateResponse]:
        return self

    def __next__(self) -> pb.GenerateResponse:
        while True:
            try:
                response = next(self._call)
            except grpc.RpcError as e:
                if (delay := self._retry_after(e)) is None:
                    raise
                time.sleep(delay)
                self._restart(e)
                continue
            self._received = True
            return response


def _completion(responses: list[pb.GenerateResponse]) -> Completion:
    last = responses[-1] if responses else pb.GenerateResponse()
    return Completion(last.request_id, last.prompt_tokens, tuple(t for r in responses for t in r.token_ids),
                      "".join(r.text for r in responses), FINISH_NAMES.get(last.finish_reason), last.timings)


def client_for(state: ClusterState, timeout_s: float | None = None, sync: bool = False) -> Client | SyncClient:
    """A client for the cluster `pdserve up` started: its token and certificate from the files its config named
    (a `SyncClient` with `sync`)."""
    token = _first_line(state.token_file) if state.token_file else None
    certs = None
    if state.tls_cert_file:
        with open(state.tls_cert_file, "rb") as f:
            certs = f.read()
    return (SyncClient if sync else Client)(state.router_address, timeout_s, token, certs)


def _first_line(path: str) -> str:
    with open(path) as f:
        return f.read().splitlines()[0].strip()
