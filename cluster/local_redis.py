"""A redis-server for one cluster, started on a free loopback port (the embedded default when no redis_url is set).

Nothing is persisted (`--save "" --appendonly no`): the registry rebuilds itself from heartbeats.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time

import redis

log = logging.getLogger(__name__)


class RedisNotFound(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisNotFound("redis_url: unset, so pdserve starts a local redis-server, but none is installed "
                                "(apt-get install -y redis-server), or set redis_url to a running server")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready()
        log.info("local redis-server on %s (pid %d)", self.url, self.process.pid)

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
