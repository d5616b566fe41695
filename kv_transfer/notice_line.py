"""Short JSON notices between the two workers of a same-node KV pair: one Unix stream socket per pair, in Linux's
abstract namespace (no file to clean up; gone when both ends close), under a random name that only the pair's store
tells. One line of JSON per notice.

    listener, address = listen()      # one side: put `address` in the pair's store
    line = accept(listener, 60.0)     # ... and wait for the peer
    line = dial(address, 60.0)        # the other side
    line.send({"op": "send", ...}); line.receive() -> [notices that came], never waiting

A line is closed for good when the peer closes its end, or its process dies (`closed`).
"""

from __future__ import annotations

import json
import secrets
import select
import socket

SEND_TIMEOUT_S = 5.0
"""How long a notice may wait for room in the socket (a peer that stopped reading): then the line is broken."""
READ_CHUNK = 1 << 16


class LineBroken(ConnectionError):
    """The peer's end of the line is gone, or would not take a notice in time."""


def listen() -> tuple[socket.socket, str]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    address = f"pdserve-kv-{secrets.token_hex(16)}"
    listener.bind("\0" + address)
    listener.listen(1)
    return listener, address


def accept(listener: socket.socket, timeout_s: float) -> NoticeLine:
    """The peer's connection; `socket.timeout` (an OSError) if it does not come in `timeout_s`."""
    listener.settimeout(timeout_s)
    try:
        connection, _ = listener.accept()
    finally:
        listener.close()
    return NoticeLine(connection)


def dial(address: str, timeout_s: float) -> NoticeLine:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(timeout_s)
    connection.connect("\0" + address)
    return NoticeLine(connection)


class NoticeLine:
    def __init__(self, connection: socket.socket) -> None:
        connection.settimeout(SEND_TIMEOUT_S)
        self._socket = connection
        self._pending = b""
        """Bytes of a notice not wholly read yet."""
        self.closed = False

    def send(self, notice: dict) -> None:
        """Raises LineBroken if the peer is gone or does not read."""
        if self.closed:
            raise LineBroken("the notice line is closed")
        try:
            self._socket.sendall(json.dumps(notice).encode() + b"\n")
        except OSError as e:
            self.close()
            raise LineBroken(f"the peer's notice line is gone ({e})") from e

    def receive(self) -> list[dict]:
        """The notices that came since the last call (none if the line is closed); never waits."""
        chunks = []
        while not self.closed and select.select([self._socket], [], [], 0)[0]:
            try:
                chunk = self._socket.recv(READ_CHUNK)
            except OSError:
                chunk = b""
            if not chunk:  # the peer closed its end (or its process died)
                self.close()
                break
            chunks.append(chunk)
        if not chunks:
            return []
        data = self._pending + b"".join(chunks)
        *lines, self._pending = data.split(b"\n")
        return [json.loads(line) for line in lines if line]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._socket.close()
