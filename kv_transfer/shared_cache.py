"""A worker's KV cache made readable by other processes on its node, and a peer's cache mapped into this one: the
memory side of the same-node connector (`ipc_connector`).

- CPU: the cache's storage moves, in place, into a shared-memory file that is unlinked at once and kept open
  (torch's own file-descriptor sharing, the one `torch.multiprocessing` uses by default): the memory goes when the
  last process holding it does, however they end, so nothing is left in /dev/shm even after a SIGKILL. A peer opens
  it through `/proc/<owner pid>/fd/<fd>` (allowed between processes of one user). Every view the engine took before
  follows, as the storage object stays the same. The memory counts against /dev/shm, which containers often keep
  small (Docker's default is 64 MiB), so `share` first checks there is room and says so if not (a write past a full
  tmpfs would kill the worker with SIGBUS, not raise).
- CUDA: a CUDA IPC handle of the cache's allocation (what `torch.multiprocessing` sends for a CUDA tensor). The peer
  opens it on the GPU with the same UUID (Ray gives each worker its own CUDA_VISIBLE_DEVICES, so the index may
  differ), and copies between the two caches are device-to-device: no host round trip.

    description = share(cache.tensor)                  # owner, once (JSON-able: it goes through the pair's store)
    peer_cache = open_shared(description)              # peer: a tensor over the owner's memory
"""

from __future__ import annotations

import os
import socket

import torch

from pdserve.kv_transfer.connector import TransferError

SHM_FOLDER = "/dev/shm"
SHM_HEADROOM = 1.1
"""Free space /dev/shm must have, as a multiple of the cache, before the cache moves there."""


def node_id() -> str:
    """The same for every process of one machine (and container: they share a hostname), different across them."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def share(tensor: torch.Tensor) -> dict:
    """Make `tensor` (a whole, contiguous KV cache) readable by other processes of this node; returns what they
    need to map it."""
    if not tensor.is_contiguous() or tensor.storage_offset() != 0:
        raise TransferError("only a whole, contiguous KV cache can be shared")
    geometry = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    storage = tensor.untyped_storage()
    try:
        return {**geometry, **_share_storage(storage, tensor.device)}
    except RuntimeError as e:  # what torch raises where the memory cannot be shared
        raise TransferError(f"the KV cache cannot be shared with other processes: {e}") from e


def _share_storage(storage: torch.UntypedStorage, device: torch.device) -> dict:
    if device.type == "cuda":
        index, handle, size, offset, counter, counter_offset, event, event_sync = storage._share_cuda_()
        return {"kind": "cuda", "gpu": str(torch.cuda.get_device_properties(index).uuid),
                "handle": handle.hex(), "size": size, "offset": offset, "counter": counter.hex(),
                "counter_offset": counter_offset, "event": event.hex() if event else "", "event_sync": event_sync}
    if device.type != "cpu":
        raise TransferError(f"a KV cache on {device.type} cannot be shared")
    if not storage.is_shared():
        _check_shm_room(storage.nbytes())
    fd, size = storage._share_fd_cpu_()
    return {"kind": "cpu", "pid": os.getpid(), "fd": fd, "size": size}


def open_shared(description: dict) -> torch.Tensor:
    """The tensor `share` described, over the owner's memory; TransferError if this process cannot map it."""
    dtype = getattr(torch, description["dtype"])
    if description["kind"] == "cuda":
        storage = _open_cuda(description)
    else:
        storage = _open_cpu(description)
    shape = description["shape"]
    return torch.empty((0,), dtype=dtype, device=storage.device).set_(storage, 0, shape,
                                                                       _contiguous_strides(shape))


def _open_cpu(description: dict) -> torch.UntypedStorage:
    path = f"/proc/{description['pid']}/fd/{description['fd']}"
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise TransferError(f"cannot open the peer's KV cache ({path}): {e}") from e
    try:
        return torch.UntypedStorage._new_shared_fd_cpu(fd, description["size"])  # maps a duplicate of `fd`
    except RuntimeError as e:
        raise TransferError(f"cannot map the peer's KV cache ({path}): {e}") from e
    finally:
        os.close(fd)


def _open_cuda(description: dict) -> torch.UntypedStorage:
    if not torch.cuda.is_available():
        raise TransferError("the peer's KV cache is on a GPU and this process has none")
    uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    if description["gpu"] not in uuids:
        raise TransferError(f"the peer's GPU ({description['gpu']}) is not visible to this process")
    event = bytes.fromhex(description["event"]) if description["event"] else None
    try:
        return torch.UntypedStorage._new_shared_cuda(
            uuids.index(description["gpu"]), bytes.fromhex(description["handle"]), description["size"],
            description["offset"], bytes.fromhex(description["counter"]), description["counter_offset"], event,
            description["event_sync"])
    except RuntimeError as e:  # cudaIpcOpenMemHandle refused (another container's GPU, no peer access)
        raise TransferError(f"cannot open the peer's CUDA IPC handle: {e}") from e


def _check_shm_room(nbytes: int) -> None:
    try:
        stats = os.statvfs(SHM_FOLDER)
    except OSError as e:
        raise TransferError(f"no shared memory to put the KV cache in ({SHM_FOLDER}: {e})") from e
    free = stats.f_bavail * stats.f_frsize
    if free < nbytes * SHM_HEADROOM:
        raise TransferError(f"{SHM_FOLDER} has {free / 2**20:.0f} MiB free; the KV cache needs "
                            f"{nbytes * SHM_HEADROOM / 2**20:.0f} MiB there to be shared (give the container more "
                            f"shared memory, or use kv_transfer.backend gloo)")


def _contiguous_strides(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]
