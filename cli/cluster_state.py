"""Where `pdserve up` leaves its state file, and how the other commands find the cluster and talk to it."""

from __future__ import annotations

import os

from pdserve.config import state_dir
from pdserve.control_plane.processes import alive
from pdserve.control_plane.state_file import ClusterState


class NoCluster(RuntimeError):
    pass


def state_path() -> str:
    return os.path.join(state_dir(), "cluster.json")


def log_path() -> str:
    """The cluster's log, beside its state file (`pdserve up --detach` appends to it)."""
    return os.path.join(os.path.dirname(state_path()), "cluster.log")


def pid_alive(pid: int | None) -> bool:
    return alive(pid, "pdserve")  # a control plane (`pdserve up`) or a router


def read_state() -> ClusterState:
    """The state of the cluster `pdserve up` started. Its routers serve even while its control plane is down, so
    a state file whose control plane died still names a cluster (NoCluster only when nothing of it runs)."""
    path = state_path()
    if not os.path.exists(path):
        raise NoCluster(f"no cluster is up (no {path}); start one with `pdserve up`")
    state = ClusterState.read(path)
    if not (pid_alive(state.pid) or any(pid_alive(p) for p in state.router_pids)):
        raise NoCluster(f"the cluster in {path} is gone (pid {state.pid} is not running); `pdserve down` cleans up")
    return state


def router_client(given: str | None, timeout_s: float | None = None, sync: bool = False):
    """A client for the routers at `given` ("host:port", or several comma-separated; token from $PDSERVE_TOKEN),
    or for the cluster `pdserve up` started (its token and certificate files); a `SyncClient` with `sync`."""
    from pdserve.client import Client, SyncClient

    if given:
        return (SyncClient if sync else Client)(given, timeout_s)
    return read_state().client(timeout_s, sync)
