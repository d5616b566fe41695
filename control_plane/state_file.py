"""What `pdserve up` leaves in its state file: for `pdserve status` and `pdserve down`, and for a control plane
started again to adopt what the last one left running (light: no Ray import)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterState:
    """The cluster `pdserve up` started: its control plane, routers, Redis, Ray head and mode."""

    pid: int
    """The control plane's process."""
    router_address: str
    """The first router's gRPC host:port (the one the CLI talks to)."""
    redis_url: str
    redis_pid: int | None
    """The local redis-server the cluster started (None: redis_url was given, not ours to stop)."""
    mode: str
    metrics_address: str = ""
    """host:port of the first router's Prometheus /metrics."""
    token_file: str = ""
    """The router's bearer token file (the path, never the token), for the CLI's own calls; empty: no token."""
    tls_cert_file: str = ""
    """The router's TLS certificate (the CLI trusts it); empty: plain gRPC."""
    http_address: str = ""
    """host:port of the first router's OpenAI-compatible HTTP API; empty when it is off."""
    ray_logs_dir: str = ""
    """The Ray session's log folder on this machine (the workers' output, `pdserve logs --worker`)."""
    ray_address: str = ""
    """The Ray cluster's GCS address."""
    ray_head_pid: int | None = None
    """The Ray head the cluster started (None: ray_address was given, not ours to stop)."""
    ray_token_file: str = ""
    """The token that Ray head asks its clients for (`control_plane.ray_head.auth_env`); empty with ray_address."""
    router_pids: tuple[int, ...] = ()
    """The router processes the control plane runs (as of its last write)."""

    def client(self, timeout_s: float | None = None, sync: bool = False):
        """A client for the cluster's first router, with the token and certificate of the files its config named
        (a `SyncClient` with `sync`, else the asyncio `Client`)."""
        from pdserve.client import Client, SyncClient

        token = _first_line(self.token_file) if self.token_file else None
        certs = None
        if self.tls_cert_file:
            with open(self.tls_cert_file, "rb") as f:
                certs = f.read()
        return (SyncClient if sync else Client)(self.router_address, timeout_s, token, certs)

    def write(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(self), f)
        os.replace(tmp, path)

    @staticmethod
    def read(path: str) -> ClusterState:
        with open(path) as f:
            values = json.load(f)
        values["router_pids"] = tuple(values.get("router_pids", ()))
        return ClusterState(**values)


def _first_line(path: str) -> str:
    with open(path) as f:
        return f.read().splitlines()[0].strip()
