"""Short JSON notices between the two workers of a same-node KV pair: one Unix stream socket per pair, in Linux's
abstract namespace (no file to clean up; gone when both ends close), under a random name that the pair's store
gives the peer. One line of JSON per notice.

    listener, address = listen()              # one side: put `address` and `me()` in the pair's store
    line = accept(listener, 60.0, their_id)   # ... and wait for the peer (their `me()`, from the store)
    line = dial(address, 60.0, their_id)      # the other side
    line.send({"op": "send", ...}); line.receive() -> [notices that came], never waiting

The name is not a secret (any local user can list abstract sockets in /proc/net/unix), so each end checks who is at
the other through the kernel (SO_PEERCRED): the same user, and the very process the pair's store names where both
share a PID namespace. A connection from anyone else is closed unread and the listener waits on.

A line is closed for good when the peer closes its end, or its process dies (`closed`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import socket
import struct
import time
from dataclasses import dataclass

SEND_TIMEOUT_S = 5.0
"""How long a notice may wait for room in the socket (a peer that stopped reading): then the line is broken."""
READ_CHUNK = 1 << 16
_CREDENTIALS = struct.Struct("3i")
"""struct ucred: pid, uid, gid."""

log = logging.getLogger(__name__)


class LineBroken(ConnectionError):
    """The peer's end of the line is gone, or would not take a notice in time."""


class WrongPeer(ConnectionError):
    """The process at the other end of the socket is not the pair's peer."""


@dataclass(frozen=True)
class ProcessId:
    """Who a worker's process is, as the kernel will name it to the peer: put in the pair's store."""

    pid: int
    uid: int
    pid_namespace: str
    """The PID namespace the pid is counted in (`/proc/self/ns/pid`): pids compare only within one."""

    def to_json(self) -> dict:
        return {"pid": self.pid, "uid": self.uid, "pid_namespace": self.pid_namespace}

    @staticmethod
    def from_json(data: dict) -> ProcessId:
        return ProcessId(int(data["pid"]), int(data["uid"]), str(data["pid_namespace"]))


def me() -> ProcessId:
    return ProcessId(os.getpid(), os.getuid(), _pid_namespace())


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def check_peer(connection: socket.socket, expected: ProcessId) -> None:
    """Raises WrongPeer unless the kernel says the other end is `expected`'s user and, in one PID namespace, its
    process."""
    pid, uid, _ = _CREDENTIALS.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            _CREDENTIALS.size))
    if uid != os.getuid() or uid != expected.uid:
        raise WrongPeer(f"the notice line's other end runs as uid {uid}, not {expected.uid}")
    same_namespace = expected.pid_namespace and expected.pid_namespace == _pid_namespace()
    if same_namespace and pid != expected.pid:
        raise WrongPeer(f"the notice line's other end is pid {pid}, not the peer's pid {expected.pid}")


def listen() -> tuple[socket.socket, str]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    address = f"pdserve-kv-{secrets.token_hex(16)}"
    listener.bind("\0" + address)
    listener.listen(4)
    return listener, address


def accept(listener: socket.socket, timeout_s: float, peer: ProcessId) -> NoticeLine:
    """The peer's connection; `socket.timeout` (an OSError) if it does not come in `timeout_s`. A connection from
    any other process is closed, and the wait goes on."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            listener.settimeout(max(deadline - time.monotonic(), 0.001))
            connection, _ = listener.accept()
            try:
                check_peer(connection, peer)
            except WrongPeer as e:
                log.warning("refused a connection to a KV notice line: %s", e)
                connection.close()
                continue
            return NoticeLine(connection)
    finally:
        listener.close()


def dial(address: str, timeout_s: float, peer: ProcessId) -> NoticeLine:
    """Raises WrongPeer if the socket at `address` is not the peer's."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(timeout_s)
    try:
        connection.connect("\0" + address)
        check_peer(connection, peer)
    except OSError:
        connection.close()
        raise
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
        readable = select.poll()  # (not select.select: it refuses descriptors past 1024, as a busy worker's can be)
        readable.register(self._socket, select.POLLIN)
        while not self.closed and readable.poll(0):
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
