"""Where a KV pair's two workers meet to form their process group, and the interface its gloo sockets use.

On one machine (the worker's host is loopback, as in a local cluster) the meeting place is a folder: each pair
forms over a `FileStore` file of its own in the receiving worker's folder, and gloo is told to use the loopback
interface, so no KV port listens beyond 127.0.0.1. Across machines it is a `TCPStore` hosted by the receiving
worker (torch's TCPStore listens on every interface; keep those ports inside a trusted network).

    address = rendezvous.host()                   # the receiving worker, once: "file:<folder>" or "host:port"
    store = rendezvous.store(address, pair_name)  # both workers of a pair, with the same name

A folder holds its owner's pid and pid namespace; `close` removes it, and a worker that died without closing leaves it
behind until the next worker on the machine (in the same pid namespace: a pid means nothing across them) starts
hosting and removes every folder whose owner is gone.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import tempfile
from datetime import timedelta

import torch.distributed as dist

FILE_PREFIX = "file:"
FOLDER_PREFIX = "pdserve-kv-"
OWNER_FILE = "owner.pid"
STORE_TIMEOUT = timedelta(seconds=60)
LOOPBACK_INTERFACE = "lo"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Rendezvous:
    def __init__(self, host: str, worker_id: str) -> None:
        self.host_name = host
        self.worker_id = worker_id
        self._tcp: dist.TCPStore | None = None
        self._folder: str | None = None
        if is_loopback(host) and LOOPBACK_INTERFACE in {name for _, name in socket.if_nameindex()}:
            # this worker process's gloo pairs: sockets on 127.0.0.1 only (read when a group is formed)
            os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_INTERFACE)

    def host(self) -> str:
        """Start hosting pairs (the receiving worker); returns the address its peers meet at."""
        if is_loopback(self.host_name):
            remove_orphaned_folders(tempfile.gettempdir())
            self._folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{self.worker_id}-")
            with open(os.path.join(self._folder, OWNER_FILE), "w") as f:
                f.write(f"{os.getpid()} {_pid_namespace()}")
            return f"{FILE_PREFIX}{self._folder}"
        self._tcp = dist.TCPStore(self.host_name, 0, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
        return f"{self.host_name}:{self._tcp.port}"

    def store(self, address: str, pair_name: str) -> dist.Store:
        """The store the pair `pair_name` forms over, at `address` (from `host`, on either side of the pair)."""
        if address.startswith(FILE_PREFIX):
            folder = address.removeprefix(FILE_PREFIX)
            return dist.FileStore(os.path.join(folder, pair_name.replace("|", "~")), 2)
        if self._tcp is not None and address == f"{self.host_name}:{self._tcp.port}":
            return self._tcp
        host, port = address.rsplit(":", 1)
        return dist.TCPStore(host, int(port), is_master=False, timeout=STORE_TIMEOUT)

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def remove_orphaned_folders(parent: str) -> list[str]:
    """Remove the rendezvous folders in `parent` whose owning process is gone (a worker that crashed); the removed.
    A folder without an owner file (one being made right now, or another program's) is left alone."""
    removed = []
    for entry in os.scandir(parent):
        if not (entry.name.startswith(FOLDER_PREFIX) and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            with open(os.path.join(entry.path, OWNER_FILE)) as f:
                pid, _, namespace = f.read().partition(" ")
            owner = int(pid)
        except (OSError, ValueError):
            continue
        if namespace == _pid_namespace() and not _alive(owner):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # e.g. "pid:[4026531836]"
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive, and not ours to judge
    return True
