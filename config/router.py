"""The `router:` section: the public ports, admission, connection limits, TLS and token, and how requests are
routed."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.config.bounds import at_least
from pdserve.engine.config import ConfigError

ROUTINGS = ("load", "kv_aware")


@dataclass(frozen=True)
class Router:
    host: str = "127.0.0.1"
    """The public gRPC port's address; 0.0.0.0 to serve beyond this machine."""
    port: int = 50051
    http_port: int | None = 8000
    """OpenAI-compatible HTTP (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics) on `host`;
    null turns it off."""
    served_model_name: str | None = None
    """The model's name in the HTTP API (/v1/models, the requests' `model`); unset: `engine.model`."""
    metrics_port: int | None = None
    """Prometheus /metrics of the router, on 127.0.0.1; unset picks a free port (in the state file, `pdserve status`).
    Each worker serves its own on a free port, named in its registry entry (`metrics_port`)."""
    max_waiting: int = 1024
    """The admission queue: requests accepted and not yet given a worker (waiting for KV room). Beyond it a new
    request gets RESOURCE_EXHAUSTED at once. Requests waiting here have no deadline but the client's own."""
    lease_s: float = 30.0
    """How long a decode worker keeps the requests of a router that stopped collecting their tokens (killed, hung,
    cut off) before it aborts them and frees their KV blocks. Within it a client that reconnects (to the restarted
    router, or another one) takes its request over where it left off."""
    token_file: str | None = None
    """A file whose first line is the bearer token every call must carry (`authorization: Bearer <token>`);
    unset: no token is asked for (fine on 127.0.0.1, not beyond)."""
    tls_cert_file: str | None = None
    """PEM certificate chain for the public port; with tls_key_file, the router speaks TLS only."""
    tls_key_file: str | None = None
    worker_wait_s: float = 30.0
    """How long a request waits for a worker when none of the kind it needs is ready (one died and its replacement
    is starting: ~12 s under load here; a request resumed from the dead one waits too) before UNAVAILABLE. The
    client's own deadline still applies."""
    max_body_bytes: int = 10 * 2**20
    """HTTP request bodies larger than this are refused (413) before they are read whole. gRPC messages are bounded
    by gRPC's own 4 MiB default."""
    max_file_bytes: int = 200 * 2**20
    """Files uploaded to the Batch API (POST /v1/files) may be this large; other bodies keep max_body_bytes."""
    files_dir: str | None = None
    """Where the Batch API keeps its files (inputs, outputs); the routers of a cluster must share it. Unset: `files`
    beside the cluster's state file ($PDSERVE_STATE_DIR, or ~/.cache/pdserve/run)."""
    max_connections: int = 4096
    """Open HTTP connections at most (gRPC: the same bound of its own). A new one beyond it takes the place of the
    oldest connection that has sent no request, so a flood of idle connections cannot lock clients out."""
    max_connections_per_address: int = 1024
    """Open HTTP connections from one client address at most (a proxy in front counts as one address)."""
    header_timeout_s: float = 10.0
    """A connection that has not sent a whole request head (HTTP) or finished its handshake (gRPC) this long after
    it opened is closed."""
    routing: str = "kv_aware"
    """How a request's workers are chosen. "load": the decode worker with the most free KV blocks, then the paired
    prefill worker with the fewest queued prompt tokens. "kv_aware" (with engine.prefix_caching): the same, weighed
    against the leading blocks of the prompt each worker holds in its prefix cache, as the workers' cache events
    tell (router/policy.py has the cost). A prompt no worker holds any of is routed as with "load"."""
    low_priority_limit: int = 8
    """Low-priority requests (priority above 0: the Batch API's, or a client's `priority`) this router lets through
    to workers at once, and only while no online request waits here for a worker (router/priority_gate.py)."""
    cache_weight: float = 1.0
    """KV-aware routing's weight of cache misses against load. Prefill cost: queued prompt tokens + cache_weight x
    the prompt tokens that worker would compute. Decode cost: the share of its KV blocks in use + cache_weight x the
    share of the prompt's blocks it would receive. 0 routes by load alone; larger follows the cache further into
    load."""

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ConfigError(f"router.routing: {self.routing!r} is not one of {list(ROUTINGS)}")
        if not (self.cache_weight >= 0 and math.isfinite(self.cache_weight)):
            raise ConfigError(f"router.cache_weight: must be a finite number >= 0, got {self.cache_weight!r}")
        for name in ("port", "http_port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 65536:
                raise ConfigError(f"{name}: must be a port number (1-65535), got {value!r}")
        ports = {name: getattr(self, name) for name in ("port", "http_port", "metrics_port")
                 if getattr(self, name) is not None}
        if len(set(ports.values())) < len(ports):
            raise ConfigError(f"router ports must differ (one server each), got {ports}")
        at_least("max_waiting", self.max_waiting, 1)
        at_least("low_priority_limit", self.low_priority_limit, 1)
        at_least("max_body_bytes", self.max_body_bytes, 1024)
        at_least("max_file_bytes", self.max_file_bytes, 1024)
        at_least("worker_wait_s", self.worker_wait_s, 0)
        at_least("max_connections", self.max_connections, 16)
        at_least("max_connections_per_address", self.max_connections_per_address, 1)
        at_least("header_timeout_s", self.header_timeout_s, 0.1)
        at_least("lease_s", self.lease_s, 1)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file, tls_key_file: give both (TLS on) or neither (TLS off)")
