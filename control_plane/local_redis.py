"""A redis-server for one cluster, started on a free loopback port (the default when no redis_url is set), in a
session of its own so that it outlives the control plane that started it; a control plane started later adopts it.

Nothing is persisted (`--save "" --appendonly no`): the registry rebuilds itself from heartbeats.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import redis

from pdserve.control_plane.processes import alive, end_tree

log = logging.getLogger(__name__)

START_TIMEOUT_S = 20.0
MARK = "redis-server"
"""A word of the server's command line (a pid from a state file that lacks it is another process now)."""


class RedisNotFound(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LocalRedis:
    url: str
    pid: int

    @staticmethod
    def start(port: int | None = None) -> LocalRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisNotFound("redis_url: unset, so pdserve starts a local redis-server, but none is installed "
                                "(apt-get install -y redis-server), or set redis_url to a running server")
        port = port or free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        server = LocalRedis(f"redis://127.0.0.1:{port}/0", process.pid)
        server._wait_ready(process)
        log.info("local redis-server on %s (pid %d)", server.url, server.pid)
        return server

    @staticmethod
    def adopt(url: str, pid: int) -> LocalRedis | None:
        """The server a previous control plane started, if it still runs and answers."""
        server = LocalRedis(url, pid)
        return server if alive(pid, MARK) and server.answers() else None

    def answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        end_tree(self.pid, MARK, grace_s=10, what="redis-server")

    def _wait_ready(self, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server at {self.url} did not start")
            time.sleep(0.05)
