"""The routers a control plane keeps running: router processes (`python -m pdserve.router.main`), one per slot (its
address and ports). A router that exits (killed, crashed) is started again on its slot within WATCH_S, and serves
a few seconds later; a router a previous control plane started, still running, is adopted (found in the registry
at its slot's address) and watched by its pid.

Routers run in sessions of their own: a control plane that dies leaves them serving; the next one adopts them.
Their output goes to the control plane's log.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from dataclasses import dataclass

from pdserve.control_plane.processes import alive, end_tree
from pdserve.registry.entries import RouterInfo

log = logging.getLogger(__name__)

WATCH_S = 0.5
MARK = "pdserve.router.main"
"""A word of a router's command line (a pid from the registry that lacks it is another process now)."""
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class RouterSlot:
    host: str
    port: int
    http_port: int | None
    """None: no HTTP API."""
    metrics_port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_address(self) -> str:
        return f"{self.host}:{self.http_port}" if self.http_port is not None else ""


@dataclass
class _Router:
    slot: RouterSlot
    pid: int
    process: subprocess.Popen | None
    """None for a router adopted from a previous control plane (not this process's child)."""

    def exited(self) -> bool:
        return self.process.poll() is not None if self.process is not None else not alive(self.pid, MARK)


class RouterPool:
    def __init__(self, redis_url: str, slots: list[RouterSlot]) -> None:
        self.redis_url = redis_url
        self.slots = slots
        self.routers: list[_Router] = []
        self.restarts = 0

    def start(self, running: list[RouterInfo]) -> None:
        """Adopt the routers in `running` (the registry's) that serve a slot; start one on every other slot."""
        by_address = {r.address: r for r in running if alive(r.pid, MARK)}
        for slot in self.slots:
            adopted = by_address.get(slot.address)
            if adopted is not None:
                log.warning("adopted router %s on %s (pid %d)", adopted.router_id, slot.address, adopted.pid)
                self.routers.append(_Router(slot, adopted.pid, None))
            else:
                self.routers.append(self._spawn(slot))

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(r.pid for r in self.routers)

    async def watch(self, changed=None) -> None:
        """Start again every router that exited; `changed()` after each restart (the state file lists pids)."""
        while True:
            await asyncio.sleep(WATCH_S)
            for i, router in enumerate(self.routers):
                if router.exited():
                    code = router.process.returncode if router.process is not None else "unknown"
                    self.routers[i] = self._spawn(router.slot)
                    self.restarts += 1
                    log.warning("router on %s (pid %d) exited (code %s); started again as pid %d",
                                router.slot.address, router.pid, code, self.routers[i].pid)
                    if changed is not None:
                        changed()

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(end_tree, r.pid, MARK, STOP_GRACE_S, "router")
                               for r in self.routers))
        self.routers = []

    def _spawn(self, slot: RouterSlot) -> _Router:
        command = [sys.executable, "-m", MARK, "--redis-url", self.redis_url, "--host", slot.host,
                   "--port", str(slot.port), "--metrics-port", str(slot.metrics_port)]
        if slot.http_port is not None:
            command += ["--http-port", str(slot.http_port)]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        return _Router(slot, process.pid, process)
