"""Who may call a router (and, through it, the control plane): a bearer token checked on every RPC, and TLS on the
router's public port.

    router:
      token_file: /etc/pdserve/token        # its first line is the token; clients send "authorization: Bearer <it>"
      tls_cert_file: /etc/pdserve/tls.crt   # with tls_key_file: the public port speaks TLS only
      tls_key_file: /etc/pdserve/tls.key

A call without the right token gets UNAUTHENTICATED before it reaches a service (the token is compared in constant
time); the control plane's Control service asks for the same token. Nothing else listens beyond loopback by
default: workers, Redis, the control plane and the metrics ports bind 127.0.0.1.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from pdserve.config import ConfigError, Router

AUTHORIZATION = "authorization"


@dataclass(frozen=True)
class Access:
    token: str | None = None
    tls: tuple[bytes, bytes] | None = None
    """(certificate chain, private key), PEM."""


NO_ACCESS_CONTROL = Access()


def load_access(router: Router) -> Access:
    """The token and TLS material the config names; a missing, unreadable or empty file names its field."""
    token = _read("router.token_file", router.token_file).decode().splitlines()[0].strip() \
        if router.token_file else None
    if router.token_file and not token:
        raise ConfigError(f"router.token_file: {router.token_file} has no token on its first line")
    tls = None
    if router.tls_cert_file:
        tls = (_read("router.tls_cert_file", router.tls_cert_file), _read("router.tls_key_file", router.tls_key_file))
    return Access(token, tls)


def _read(field: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{field}: cannot read {path}: {e.strerror}") from e
    if not data.strip():
        raise ConfigError(f"{field}: {path} is empty")
    return data


class BearerToken(grpc.aio.ServerInterceptor):
    """Refuses every call whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        given = dict(details.invocation_metadata or ()).get(AUTHORIZATION, "")
        if handler is None or hmac.compare_digest(given.encode(), self._expected):
            return handler
        reason = "missing bearer token" if not given else "wrong bearer token"
        return _refusal(handler, f"{reason} (send 'authorization: Bearer <token>')")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as a streaming handler must be; abort raised before it

    codecs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **codecs)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **codecs)
    raise TypeError("the router serves unary and server-streaming methods only")
