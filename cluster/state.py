"""What `pdserve up` leaves in its state file for `pdserve status` and `pdserve down` (light: no Ray import)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterState:
    """The cluster `pdserve up` started: its supervisor pid, router, Redis and mode."""

    pid: int
    router_address: str
    redis_url: str
    redis_pid: int | None
    mode: str
    metrics_address: str = ""
    """host:port of the router's Prometheus /metrics; empty in state files from before it served one."""
    token_file: str = ""
    """The router's bearer token file (the path, never the token), for the CLI's own calls; empty: no token."""
    tls_cert_file: str = ""
    """The router's TLS certificate (the CLI trusts it); empty: plain gRPC."""
    http_address: str = ""
    """host:port of the OpenAI-compatible HTTP API; empty when it is off."""
    ray_logs_dir: str = ""
    """The Ray session's log folder on this machine (the workers' output, `pdserve logs --worker`)."""

    def write(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.__dict__, f)
        os.replace(tmp, path)

    @staticmethod
    def read(path: str) -> "ClusterState":
        with open(path) as f:
            return ClusterState(**json.load(f))
