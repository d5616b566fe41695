"""One call to the cluster's router for a CLI command, with the errors every command reports the same way.

    result = call_router("pdserve scale", args.router, lambda client: client.scale(decode=2), timeout_s=600)
    if isinstance(result, Failed):
        return result.exit_code

Exit codes (for scripts): 0 done, 1 no cluster or the router does not answer, 2 the request was refused (a bad
argument, or a change the cluster cannot take; the router's message says which).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from pdserve.cli.cluster_state import NoCluster, router_client

T = TypeVar("T")

EXIT_NO_CLUSTER = 1
EXIT_REFUSED = 2
_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
             grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.ALREADY_EXISTS}


@dataclass(frozen=True)
class Failed:
    exit_code: int


def call_router(command: str, router: str | None, call: Callable, timeout_s: float = 10) -> T | Failed:
    """`call(client)` on a SyncClient for `router` (or the cluster `pdserve up` started); errors printed to stderr
    prefixed with `command`."""
    try:
        with router_client(router, timeout_s=timeout_s, sync=True) as client:
            return call(client)
    except NoCluster as e:
        print(f"{command}: {e}", file=sys.stderr)
        return Failed(EXIT_NO_CLUSTER)
    except OSError as e:  # the token or certificate file the cluster named
        print(f"{command}: {e}", file=sys.stderr)
        return Failed(EXIT_NO_CLUSTER)
    except grpc.RpcError as e:
        if e.code() in _REFUSALS:
            print(f"{command}: {e.details()}", file=sys.stderr)
            return Failed(EXIT_REFUSED)
        where = router or "the cluster's router"
        print(f"{command}: {where} does not answer ({e.code().name}: {e.details()})", file=sys.stderr)
        return Failed(EXIT_NO_CLUSTER)
