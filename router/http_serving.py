"""Serving the HTTP API's ASGI app: uvicorn in the router's own event loop, on a socket bound here (so a port in use
is an error naming the field), with the connection bounds of `connection_guard`.

    running = await start_http(app, host, port, tls_files, limits)   # returns once it serves
    ... running.address, running.guard ...
    await running.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket

import uvicorn
from fastapi import FastAPI

from pdserve.router.connection_guard import ConnectionGuard, ConnectionLimits

DEFAULT_LIMITS = ConnectionLimits()


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the router process owns SIGTERM and Ctrl-C and stops us."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@dataclasses.dataclass
class RunningHttp:
    server: uvicorn.Server
    task: asyncio.Task
    address: str
    guard: ConnectionGuard

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 10)


async def start_http(app: FastAPI, host: str, port: int, tls_files: tuple[str, str] | None,
                     limits: ConnectionLimits = DEFAULT_LIMITS) -> RunningHttp:
    """Serve `app` on host:port (0: a free port) until `stop`; TLS with (certificate file, key file); connections
    bounded by `limits` (`connection_guard`)."""
    sock = _listen(host, port)
    guard = ConnectionGuard(limits)
    config = uvicorn.Config(app, http=guard.protocol, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=2,
                            ssl_certfile=tls_files[0] if tls_files else None,
                            ssl_keyfile=tls_files[1] if tls_files else None)
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
        await asyncio.sleep(0.02)
    return RunningHttp(server, task, f"{host}:{sock.getsockname()[1]}", guard)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket bound here, so a port in use is an error naming the field (uvicorn would exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"router.http_port: cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(2048)
    return sock
