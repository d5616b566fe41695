"""Reusable staging tensors for KV transfers: a fresh 90 MiB tensor costs as much in page faults as the copy into it.

Staging is needed only where a transfer cannot use the cache itself: a sender gathering scattered blocks, a receiver
whose blocks for a piece are not consecutive, and KV that arrives before its receive was posted (or after it was
given up) and is held or discarded.
"""

from __future__ import annotations

import threading

import torch


class StagingPool:
    """Staging tensors by shape, holding at most `max_bytes` of idle ones."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self.idle: dict[tuple, list[torch.Tensor]] = {}
        self.idle_bytes = 0
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        with self._lock:
            free = self.idle.get((shape, dtype, device))
            if free:
                tensor = free.pop()
                self.idle_bytes -= tensor.numel() * tensor.element_size()
                return tensor
        return torch.empty(shape, dtype=dtype, device=device)

    def give_back(self, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        with self._lock:
            if self.idle_bytes + nbytes <= self.max_bytes:
                self.idle.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(tensor)
                self.idle_bytes += nbytes
