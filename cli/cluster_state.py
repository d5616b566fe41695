"""Where `pdserve up` leaves its state file, and how the other commands find the cluster."""

from __future__ import annotations

import os

from pdserve.cluster.state import ClusterState


class NoCluster(RuntimeError):
    pass


def state_path() -> str:
    base = os.environ.get("PDSERVE_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pdserve", "run")
    return os.path.join(base, "cluster.json")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state() -> ClusterState:
    path = state_path()
    if not os.path.exists(path):
        raise NoCluster(f"no cluster is up (no {path}); start one with `pdserve up`")
    state = ClusterState.read(path)
    if not pid_alive(state.pid):
        raise NoCluster(f"the cluster in {path} is gone (pid {state.pid} is not running); `pdserve down` cleans up")
    return state


def router_client(given: str | None, timeout_s: float | None = None, sync: bool = False):
    """A client for the router at `given` (token from $PDSERVE_TOKEN), or for the cluster `pdserve up` started (its
    token and certificate files); a `SyncClient` with `sync`."""
    from pdserve.client import Client, SyncClient, client_for

    if given:
        return (SyncClient if sync else Client)(given, timeout_s)
    return client_for(read_state(), timeout_s, sync)
