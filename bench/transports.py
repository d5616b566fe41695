"""How the load generator talks to the router: its gRPC API, or the OpenAI-compatible HTTP API (as vLLM's
`bench serve` and guidellm do), so the two can be timed side by side on one cluster.

    transport = GrpcTransport("127.0.0.1:50051")           # or OpenAITransport("http://127.0.0.1:8000")
    async for tokens, queue_s in transport.stream(request_id, prompt_ids, max_tokens, timeout_s):
        ...                                                   # each message as it arrives: tokens in it
    await transport.close()

Both send the same request: token-id prompt, greedy, `max_tokens` with EOS ignored. A failure raises
`TransportError` naming the status; cancelling the iteration cancels the request on the router.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc

API_CHOICES = ("grpc", "openai")


class TransportError(RuntimeError):
    """A request that failed: the gRPC status or HTTP error, with the router's message."""


class GrpcTransport:
    def __init__(self, address: str) -> None:
        from pdserve.proto import generation_pb2_grpc as pb_grpc

        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.GenerationStub(self.channel)

    async def ready(self) -> None:
        await self.channel.channel_ready()

    async def stream(self, request_id: str, prompt_ids: tuple[int, ...], max_tokens: int,
                     timeout_s: float) -> AsyncIterator[tuple[int, float | None]]:
        """(tokens in the message, queue seconds on the last message else None) per response message."""
        from pdserve.client import build_request
        from pdserve.engine import Prompt, SamplingParams

        sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        call = self.stub.Generate(build_request(Prompt(token_ids=prompt_ids), sampling, request_id),
                                  timeout=timeout_s)
        try:
            async for response in call:
                yield len(response.token_ids), response.timings.queue_s if response.HasField("timings") else None
        except grpc.aio.AioRpcError as e:
            raise TransportError(f"{e.code().name}: {e.details()}") from e
        finally:
            call.cancel()  # no-op once the call has ended

    async def close(self) -> None:
        await self.channel.close()


class OpenAITransport:
    def __init__(self, base_url: str) -> None:
        import httpx

        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.client = httpx.AsyncClient(base_url=self.base_url, limits=httpx.Limits(max_connections=None,
                                                                                    max_keepalive_connections=64))

    async def ready(self) -> None:
        (await self.client.get("/health", timeout=10)).raise_for_status()

    async def stream(self, request_id: str, prompt_ids: tuple[int, ...], max_tokens: int,
                     timeout_s: float) -> AsyncIterator[tuple[int, float | None]]:
        """Tokens per SSE chunk (from `token_ids`, which the router returns when asked); queue time is not in
        OpenAI's format (None)."""
        import httpx

        body = {"prompt": list(prompt_ids), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "return_token_ids": True}
        try:
            async with self.client.stream("POST", "/v1/completions", json=body, timeout=timeout_s,
                                          headers={"X-Request-Id": request_id}) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    raise TransportError(f"HTTP {response.status_code}: {text[:300]}")
                async for line in response.aiter_lines():
                    tokens = _chunk_tokens(line)
                    if tokens:
                        yield tokens, None
        except httpx.TimeoutException as e:
            raise TransportError(f"timeout: {type(e).__name__}") from e
        except httpx.HTTPError as e:
            raise TransportError(f"{type(e).__name__}: {e}") from e

    async def close(self) -> None:
        await self.client.aclose()


def _chunk_tokens(line: str) -> int:
    """Tokens in one SSE line ("data: {...}"); raises on an error event."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return 0
    chunk = json.loads(line[len("data: "):])
    if "error" in chunk:
        raise TransportError(f"stream error: {chunk['error'].get('message')}")
    return sum(len(choice.get("token_ids") or ()) for choice in chunk.get("choices", ()))


def transport_for(api: str, address: str) -> GrpcTransport | OpenAITransport:
    if api == "openai":
        return OpenAITransport(address if "://" in address else f"http://{address}")
    if api == "grpc":
        return GrpcTransport(address)
    raise ValueError(f"api: one of {', '.join(API_CHOICES)}, got {api!r}")


