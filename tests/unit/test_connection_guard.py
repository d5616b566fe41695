"""The router's HTTP connection bounds (`router.connection_guard`) on the real server (uvicorn on 127.0.0.1, the fake
orchestrator): a flood of connections that never send a request head, from many loopback addresses, cannot lock out
a client with a request; one address cannot hold more than its share; a silent or trickling connection is closed
after the header timeout; kept-alive clients are served as before. (Issue 18's probe: ~21k such connections took a
router to its file limit and every client timed out.)"""

import asyncio
import json
import socket

from pdserve.access import Access
from pdserve.router.connection_guard import ConnectionLimits
from pdserve.router.http_server import OpenAIServer
from pdserve.router.http_serving import start_http

from .test_http_server import MODEL, FakeBuilder, FakeOrchestrator

LIMITS = ConnectionLimits(total=64, per_address=16, header_timeout_s=1.0)
FLOOD = 300
DEADLINE_S = 10.0


def open_idle(address: str, source: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect((host, int(port)))
    return sock


def closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    sock.settimeout(wait_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def complete(address: str) -> dict:
    """A whole completion over a fresh connection (raw HTTP/1.1, as any client sends it)."""
    host, port = address.rsplit(":", 1)
    body = json.dumps({"prompt": "hi", "max_tokens": 3}).encode()
    with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(payload)


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response (head, body) with a Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


async def serving(check) -> None:
    app = OpenAIServer(FakeBuilder(), FakeOrchestrator(), MODEL, Access()).app()
    http = await start_http(app, "127.0.0.1", 0, None, LIMITS)
    try:
        await asyncio.wait_for(asyncio.to_thread(check, http), DEADLINE_S * 3)
    finally:
        await http.stop()


def test_a_flood_of_idle_connections_does_not_lock_out_a_client():
    def check(http) -> None:
        flood = [open_idle(http.address, f"127.0.{1 + i // 12}.{1 + i % 12}") for i in range(FLOOD)]
        try:
            for _ in range(5):
                assert complete(http.address)["choices"][0]["text"] == "w0 w1 w2 "
            assert http.guard.open_connections() <= LIMITS.total
            assert http.guard.refused >= FLOOD - LIMITS.total
            assert sum(closed_by_server(s, 0.05) for s in flood[:FLOOD - LIMITS.total]) >= FLOOD - 2 * LIMITS.total
        finally:
            for sock in flood:
                sock.close()

    asyncio.run(serving(check))


def test_one_address_holds_at_most_its_share():
    def check(http) -> None:
        mine = [open_idle(http.address, "127.0.0.7") for _ in range(LIMITS.per_address + 4)]
        try:
            refused = [closed_by_server(s, 0.3) for s in mine[LIMITS.per_address:]]
            kept = [closed_by_server(s, 0.05) for s in mine[:LIMITS.per_address]]
            assert refused == [True] * 4 and kept == [False] * LIMITS.per_address
            assert complete(http.address)["choices"][0]["text"] == "w0 w1 w2 "  # another address: served
        finally:
            for sock in mine:
                sock.close()

    asyncio.run(serving(check))


def test_silent_and_trickling_connections_are_closed_after_the_header_timeout():
    def check(http) -> None:
        silent = open_idle(http.address, "127.0.0.1")
        trickle = open_idle(http.address, "127.0.0.1")
        trickle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n")  # a head never finished
        try:
            assert closed_by_server(silent, LIMITS.header_timeout_s * 4)
            assert closed_by_server(trickle, LIMITS.header_timeout_s * 4)
            assert http.guard.timed_out == 2
        finally:
            silent.close()
            trickle.close()

    asyncio.run(serving(check))


def test_a_kept_alive_connection_serves_one_request_after_another():
    def check(http) -> None:
        host, port = http.address.rsplit(":", 1)
        body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as sock:
            for _ in range(3):
                sock.sendall(request)
                head, payload = read_response(sock)
                assert head.startswith(b"HTTP/1.1 200") and json.loads(payload)["choices"][0]["text"] == "w0 w1 "
        assert http.guard.timed_out == 0 and http.guard.refused == 0

    asyncio.run(serving(check))
