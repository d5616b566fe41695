"""A small gRPC client for a pdserve router.

    async with Client("127.0.0.1:50051") as client:
        async for response in client.stream(Prompt(text="Hello"), SamplingParams(max_tokens=32, temperature=0)):
            print(response.text, end="")
        result = await client.generate(Prompt(...), SamplingParams(...))  # the whole output at once
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from pdserve.cluster.state import ClusterState
from pdserve.engine.request import Prompt
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc

AUTHORIZATION = "authorization"
FINISH_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


@dataclass(frozen=True)
class Completion:
    request_id: str
    prompt_tokens: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    timings: pb.Timings


def build_request(prompt: Prompt, sampling: SamplingParams, request_id: str = "") -> pb.GenerateRequest:
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


class Client:
    def __init__(self, address: str, timeout_s: float | None = None, token: str | None = None,
                 tls_root_certs: bytes | None = None) -> None:
        """`token`: the router's bearer token (default: $PDSERVE_TOKEN, if set). `tls_root_certs`: PEM certificates
        to trust; given, the channel is TLS."""
        self.address = address
        self.timeout_s = timeout_s
        token = token if token is not None else os.environ.get("PDSERVE_TOKEN") or None
        self.metadata = ((AUTHORIZATION, f"Bearer {token}"),) if token else None
        if tls_root_certs is not None:
            self.channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(tls_root_certs))
        else:
            self.channel = grpc.aio.insecure_channel(address)
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def stream(self, prompt: Prompt, sampling: SamplingParams, request_id: str = "") -> AsyncIterator[
            pb.GenerateResponse]:
        """The response stream; cancel it (or leave the loop) to cancel the request."""
        return self.generation.Generate(build_request(prompt, sampling, request_id), timeout=self.timeout_s,
                                        metadata=self.metadata)

    async def generate(self, prompt: Prompt, sampling: SamplingParams, request_id: str = "") -> Completion:
        ids: list[int] = []
        text: list[str] = []
        last = pb.GenerateResponse()
        async for response in self.stream(prompt, sampling, request_id):
            ids.extend(response.token_ids)
            text.append(response.text)
            last = response
        return Completion(last.request_id, last.prompt_tokens, tuple(ids), "".join(text),
                          FINISH_NAMES.get(last.finish_reason), last.timings)

    async def status(self) -> pb.StatusResponse:
        return await self.admin.Status(pb.StatusRequest(), timeout=self.timeout_s or 10, metadata=self.metadata)

    async def health(self) -> pb.HealthResponse:
        return await self.admin.Health(pb.HealthRequest(), timeout=self.timeout_s or 10, metadata=self.metadata)


def client_for(state: ClusterState, timeout_s: float | None = None) -> Client:
    """A client for the cluster `pdserve up` started: its token and certificate from the files its config named."""
    token = _first_line(state.token_file) if state.token_file else None
    certs = None
    if state.tls_cert_file:
        with open(state.tls_cert_file, "rb") as f:
            certs = f.read()
    return Client(state.router_address, timeout_s, token, certs)


def _first_line(path: str) -> str:
    with open(path) as f:
        return f.read().splitlines()[0].strip()
