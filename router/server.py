"""The router's gRPC server (grpc.aio): the public Generation service and the Admin service.

Errors map to gRPC statuses with a message naming what was wrong: a bad request is INVALID_ARGUMENT, a request id
already running is ALREADY_EXISTS, a full admission queue (or a message over MAX_MESSAGE_BYTES) is RESOURCE_EXHAUSTED,
a missing or wrong bearer token is UNAUTHENTICATED (`access`), no worker is UNAVAILABLE (a worker that fails
mid-request is not: the request resumes elsewhere, `router.migration`), a request its client took to another
router is ABORTED. A client that cancels or disconnects cancels the handler, and the orchestrator aborts the
request on its workers.

Once a request is admitted, its stream's initial metadata carries ACCEPTED (this router's id): a client whose
stream breaks after that knows the request may be running and reconnects with `resume` (`pdserve.client`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from pdserve.access import NO_ACCESS_CONTROL, Access, BearerToken
from pdserve.config import SLO
from pdserve.config import Router as RouterConfig
from pdserve.engine.logprobs import TokenLogprobs
from pdserve.engine.request import FinishReason
from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc
from pdserve.router.admin import AdminService
from pdserve.router.control_client import ControlClient
from pdserve.router.errors import DuplicateRequest, Overloaded, TakenOver, Unavailable, WorkerError
from pdserve.router.orchestrator import Orchestrator, Piece
from pdserve.router.request_builder import InvalidRequest, RequestBuilder

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 << 20
"""A request larger than this gets RESOURCE_EXHAUSTED from gRPC before it is parsed (a context's worth of token ids
is well under 1 MiB)."""

ACCEPTED = "pdserve-accepted"
"""Initial metadata key: the request was admitted (its value is the router's id)."""

FINISH = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
          FinishReason.ABORT: pb.FINISH_REASON_ABORT}


@dataclass(frozen=True)
class Undecodable:
    """A Generate request that does not parse (e.g. a string field that is not UTF-8): answered INVALID_ARGUMENT by
    the service, where gRPC itself would say UNKNOWN."""

    error: str


def _parse_generate(data: bytes) -> pb.GenerateRequest | Undecodable:
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as e:
        return Undecodable(f"request: not a valid GenerateRequest ({e}; text, messages, request_id and stop must "
                           f"be UTF-8)")


def _add_generation_service(service: GenerationService, server: grpc.aio.Server) -> None:
    """As the generated `add_GenerationServicer_to_server`, with a request parser that does not raise."""
    handler = grpc.unary_stream_rpc_method_handler(service.Generate, request_deserializer=_parse_generate,
                                                   response_serializer=pb.GenerateResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("pdserve.v1.Generation",
                                                                          {"Generate": handler}),))


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, builder: RequestBuilder, orchestrator: Orchestrator) -> None:
        self.builder = builder
        self.orchestrator = orchestrator

    async def Generate(self, request: pb.GenerateRequest | Undecodable, context: grpc.aio.ServicerContext):
        if isinstance(request, Undecodable):
            self.orchestrator.metrics.failed(InvalidRequest(request.error))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
        try:
            valid = await asyncio.to_thread(self.builder.build, request)  # a long prompt must not stall the others
        except InvalidRequest as e:
            self.orchestrator.metrics.failed(e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        first = True
        accepted = ((ACCEPTED, self.orchestrator.router_id),)
        try:
            async for piece in self.orchestrator.generate(valid, lambda: context.send_initial_metadata(accepted)):
                yield _response(valid.request_id, piece, len(valid.token_ids), first)
                first = False
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except DuplicateRequest as e:  # raised before the orchestrator counts the request
            self.orchestrator.metrics.failed(e)
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except Overloaded as e:  # raised before the orchestrator counts the request
            self.orchestrator.metrics.failed(e)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except Unavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except TakenOver as e:
            await context.abort(grpc.StatusCode.ABORTED, str(e))
        except WorkerError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))


def _response(request_id: str, piece: Piece, prompt_tokens: int, first: bool) -> pb.GenerateResponse:
    response = pb.GenerateResponse(request_id=request_id, token_ids=piece.token_ids, text=piece.text)
    response.logprobs.extend(_token_logprob(p) for p in piece.logprobs)
    response.prompt_logprobs.extend(_token_logprob(p) for p in piece.prompt_logprobs or () if p is not None)
    if first:
        response.prompt_tokens = prompt_tokens
    if piece.finish_reason is not None:
        response.finish_reason = FINISH.get(piece.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        response.prompt_tokens = prompt_tokens
        response.completion_tokens = piece.completion_tokens
        if piece.timings is not None:
            response.timings.CopyFrom(pb.Timings(**piece.timings.as_fields()))
    return response


def _token_logprob(p: TokenLogprobs) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=p.token_id, logprob=p.logprob,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in p.top])


def build_server(builder: RequestBuilder, orchestrator: Orchestrator, host: str, port: int, mode: str,
                 access: Access = NO_ACCESS_CONTROL, control: ControlClient | None = None, slo: SLO | None = None,
                 http_address: str = "", limits: RouterConfig | None = None) -> tuple[grpc.aio.Server, int]:
    """The Generation and Admin services on `host:port` (0: a free port); returns the server and its port. The port
    is this server's alone (no SO_REUSEPORT): a second router on it fails to start instead of sharing it.
    `limits`: its connections (`max_connections`) and how long a handshake may take (`header_timeout_s`)."""
    interceptors = [BearerToken(access.token)] if access.token else []
    limits = limits or RouterConfig()
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.server_handshake_timeout_ms", int(limits.header_timeout_s * 1000))])
    if access.tls is not None:
        cert, key = access.tls
        bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([(key, cert)]))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"router.port: cannot listen on {host}:{port} (in use?)")
    _add_generation_service(GenerationService(builder, orchestrator), server)
    pb_grpc.add_AdminServicer_to_server(AdminService(orchestrator, f"{host}:{bound}", mode, control, slo,
                                                     http_address), server)
    return server, bound
