"""The cluster's own Ray head on this machine, when no `ray_address` is given: `ray start --head --block` in a
session of its own, so that Ray (and with it the worker actors) outlives the control plane that started it. A
control plane started later adopts it (`adopt`); `pdserve down` ends its whole process tree.

Every port it opens is picked free here (two clusters on one machine never collide), it names this machine
127.0.0.1, and it keeps its session (sockets, logs, and the "current cluster" file a plain `ray.init()` would join)
in a folder of its own, so other Ray programs on the machine neither join it nor trip over it once it is gone.
Ray's own processes still listen on every interface (RELIABILITY.md, Access), so the head asks every client for a
token (Ray's token authentication): a random one of the cluster's own, in a file only its user can read
(`token_for`), which the control plane, the routers and the workers take from their environment (`auth_env`). Ray
reads that environment when it is imported: set it first.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve.control_plane.local_redis import free_port
from pdserve.control_plane.processes import alive, end_tree

if TYPE_CHECKING:
    from pdserve.config import ClusterConfig

log = logging.getLogger(__name__)

STOP_GRACE_S = 1.0
"""How long the head's processes get between SIGTERM and SIGKILL when the control plane stops it, after it has
stopped the workers. What is left then is Ray's own (gcs_server, raylet, its agents, `ray start --block`); in the
stops we logged, two to five of them were still running 1 s after SIGTERM and were killed anyway (a count that once
read eight at 5 s included zombies: `processes.end_tree`), so a longer grace only made each `pdserve down` wait.
They hold nothing of ours (the cluster's state is in Redis)."""

START_TIMEOUT_S = 120.0
READY_POLL_S = 0.2
JOIN_ATTEMPTS = 3
"""How many times the control plane tries `ray.init` on a head that answers. Ray gives each try ~20 s to reach the
GCS; on a loaded machine (CI's 2 cores in the middle of the suite) one try once ran out against a head that had just
passed its health check, and the cluster failed to start. (A router that fails to join exits, and the control plane
starts it again: `RouterPool.watch`.)"""
JOIN_RETRY_S = 2.0
LOCAL_CPU_OVERSUBSCRIPTION = 4
"""A local Ray gets this many times the machine's cores as logical CPUs: workers share cores once there are more
of them than cores (`pdserve scale` up to 4x)."""
MARK = "ray.scripts.scripts"
"""A word of the head's command line: a pid from a state file that lacks it is another process now."""
PORT_FLAGS = ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port")


class RayHeadError(RuntimeError):
    """The Ray head did not start."""


def auth_env(token_file: str) -> dict[str, str]:
    """The environment a process needs to join a head that asks for the token in `token_file`."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_file}


def token_for(state_path: str, head_pid: int | None) -> str:
    """The token file of the cluster whose state file is `state_path`: kept while its head (`head_pid`, from that
    state file) still runs, else a new random token. Readable by this user only; returns its path."""
    path = os.path.join(os.path.dirname(os.path.abspath(state_path)), "ray_token")
    if os.path.exists(path) and alive(head_pid, MARK):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


@dataclass(frozen=True)
class RayHead:
    address: str
    """The GCS address (host:port) drivers join."""
    pid: int
    """The `ray start --block` process, the root of the head's process tree."""
    token_file: str
    """The token it asks every client for."""

    @staticmethod
    def start(num_cpus: int, token_file: str) -> RayHead:
        """A new head asking for the token in `token_file`, once it answers."""
        return RayHead.launch(num_cpus, token_file).wait_ready()

    @staticmethod
    def launch(num_cpus: int, token_file: str) -> StartingHead:
        """A new head asking for the token in `token_file`, on its way up (`StartingHead.wait_ready`). Its own output
        goes nowhere: Ray logs to its session folder (`ray_logs_dir` in the state file)."""
        port = free_port()
        temp_dir = tempfile.mkdtemp(prefix="pdserve-ray-")  # short: Ray's socket paths must fit in 107 characters
        command = [sys.executable, "-m", MARK, "start", "--head", "--block",
                   "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(num_cpus),
                   "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir]
        for flag in PORT_FLAGS:
            command += [flag, str(free_port())]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **auth_env(token_file)}
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        return StartingHead(RayHead(f"127.0.0.1:{port}", process.pid, token_file), process)

    @staticmethod
    def adopt(address: str, pid: int, token_file: str) -> RayHead | None:
        """The head a previous control plane started, if it still runs and answers."""
        head = RayHead(address, pid, token_file)
        return head if alive(pid, MARK) and os.path.exists(token_file) and head.healthy() else None

    def healthy(self) -> bool:
        done = subprocess.run([sys.executable, "-m", MARK, "health-check", "--address", self.address],
                              capture_output=True, timeout=60, env={**os.environ, **auth_env(self.token_file)})
        return done.returncode == 0

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """End the head and everything it runs (its workers included); its token goes with it."""
        end_tree(self.pid, MARK, grace_s, what="Ray head", kill_log_level=logging.INFO)
        if os.path.exists(self.token_file):
            os.remove(self.token_file)

    def _listening(self) -> bool:
        """Its GCS port takes connections (cheap; `healthy` then asks Ray itself)."""
        host, port = self.address.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return True
        except OSError:
            return False


@dataclass(frozen=True)
class StartingHead:
    """A head `RayHead.launch` started that may not answer yet: the control plane launches it before its own slow
    imports (torch, Ray: ~2 s), which then overlap the head's start (~2.5 s)."""

    head: RayHead
    process: subprocess.Popen

    def wait_ready(self) -> RayHead:
        """The head, once its GCS takes connections and Ray says it is healthy; stopped and RayHeadError if it exits or
        does not answer within START_TIMEOUT_S."""
        head = self.head
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (head._listening() and head.healthy()):
            if self.process.poll() is not None:
                raise RayHeadError(f"ray start exited with code {self.process.returncode} (see the cluster log)")
            if time.monotonic() > deadline:
                head.stop()
                raise RayHeadError(f"the Ray head at {head.address} did not answer in {START_TIMEOUT_S:.0f} s")
            time.sleep(READY_POLL_S)
        log.info("Ray head at %s (pid %d)", head.address, head.pid)
        return head


def join_ray(address: str, namespace: str) -> None:
    """Join the Ray cluster at `address` as a driver, trying JOIN_ATTEMPTS times when its GCS does not answer in time
    (Ray raises ConnectionError then); the last failure is raised."""
    import ray  # slow (~1 s): the control plane launches its head before importing it

    for attempt in range(1, JOIN_ATTEMPTS + 1):
        try:
            ray.init(address=address, namespace=namespace, logging_level=logging.WARNING)
            return
        except ConnectionError as e:
            ray.shutdown()
            if attempt == JOIN_ATTEMPTS:
                raise
            log.warning("could not join Ray at %s (try %d of %d): %s; trying again", address, attempt,
                        JOIN_ATTEMPTS, e)
            time.sleep(JOIN_RETRY_S)


def local_cpus(config: ClusterConfig) -> int:
    """The logical CPUs a head of the cluster's own offers: the machine's cores (or what the configured workers ask
    for, if more) times LOCAL_CPU_OVERSUBSCRIPTION. Ray's CPUs only place actors here (the workers pin their own
    cores), so this leaves room for `pdserve scale`."""
    pools = config.workers
    wanted = sum(p.count * p.resources.cpus for p in (pools.prefill, pools.decode, pools.colocated))
    return max(os.cpu_count() or 1, math.ceil(wanted)) * LOCAL_CPU_OVERSUBSCRIPTION
