"""The cluster's workers as Ray knows them, for when the registry (Redis) is away.

Workers are named Ray actors (`<cluster>-<worker id>` in the cluster's namespace), so a router or a prefill worker
can find them, and ask each for its `WorkerInfo`, without Redis: a worker that joined while Redis was down (the
replacement of one that died) is served and paired at once, and the registry fills in when Redis returns.

    found = await ask_workers(namespace, cluster, known)   # actor name -> (its info, its handle)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from pdserve.registry.entries import WorkerInfo

log = logging.getLogger(__name__)

ASK_TIMEOUT_S = 2.0


async def ask_workers(namespace: str, cluster: str, known: dict[str, Any] | None = None,
                      timeout_s: float = ASK_TIMEOUT_S) -> dict[str, tuple[WorkerInfo, Any]]:
    """Every live worker actor of `cluster`, with its own answer to `info` (those that do not answer within
    `timeout_s` are left out). `known`: handles already held, by actor name (not looked up again)."""
    known = known or {}
    names = [name for name in await asyncio.to_thread(_named_actors, namespace) if name.startswith(f"{cluster}-")]
    handles = {name: known[name] for name in names if name in known}
    missing = [name for name in names if name not in handles]
    found = await asyncio.gather(*(asyncio.to_thread(ray.get_actor, name, namespace) for name in missing),
                                 return_exceptions=True)
    handles.update({name: handle for name, handle in zip(missing, found) if not isinstance(handle, BaseException)})
    answers = await asyncio.gather(*(asyncio.wait_for(h.info.remote(), timeout_s) for h in handles.values()),
                                   return_exceptions=True)
    return {name: (answer, handle) for (name, handle), answer in zip(handles.items(), answers)
            if isinstance(answer, WorkerInfo)}


def _named_actors(namespace: str) -> list[str]:
    return [entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry.get("namespace") == namespace]
