"""The router's gRPC server on 127.0.0.1 (no workers needed): a request that does not parse is INVALID_ARGUMENT, and
the last response's timings carry the prompt tokens served from a prefix cache."""

import asyncio

import grpc

from pdserve.engine.request import FinishReason
from pdserve.proto import generation_pb2 as pb
from pdserve.router.orchestrator import Orchestrator, Piece
from pdserve.router.server import _response, build_server
from pdserve.router.timings import Timings


def test_a_string_field_that_is_not_utf8_is_invalid_argument():
    good = pb.GenerateRequest(text="ab").SerializeToString()
    bad = good.replace(b"ab", b"\xff\xfe")  # same length: still a well-formed message, but not UTF-8

    async def go():
        orchestrator = Orchestrator(registry=None, namespace="test", colocated=False, block_size=16)
        server, port = build_server(None, orchestrator, "127.0.0.1", 0, "disaggregated")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                generate = channel.unary_stream("/pdserve.v1.Generation/Generate",
                                                request_serializer=lambda b: b, response_deserializer=lambda b: b)
                try:
                    async for _ in generate(bad, timeout=5):
                        pass
                except grpc.aio.AioRpcError as e:
                    return e
                return None
        finally:
            await server.stop(0)

    error = asyncio.run(go())
    assert error is not None and error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in error.details()


def test_the_last_response_carries_the_cached_prompt_tokens_in_its_timings():
    timings = Timings(0.1, 0.2, 0.01, 0.3, 0.02, 0.5, cached_tokens=48)
    last = _response("r1", Piece((7,), "x", FinishReason.LENGTH, timings, 3), 60, first=False)
    assert last.timings.cached_tokens == 48 and abs(last.timings.ttft_s - 0.3) < 1e-9
    assert not _response("r1", Piece((7,), "x"), 60, first=True).HasField("timings")
