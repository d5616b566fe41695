"""The connector a worker uses, by `kv_transfer.backend`: gloo (CPU tensors) or nccl (CUDA tensors) through
torch.distributed, nixl (either, through NIXL over UCX), or ipc (either, between workers of one node)."""

from __future__ import annotations

from pdserve.kv_transfer.connector import PairedConnector, TransferError
from pdserve.kv_transfer.ipc_connector import IpcConnector
from pdserve.kv_transfer.nixl_connector import NixlConnector
from pdserve.kv_transfer.torch_dist import TorchDistConnector

BACKENDS = ("gloo", "nccl", "nixl", "ipc")


def make_connector(worker_id: str, backend: str, checksums: bool = False) -> PairedConnector:
    if backend == "nixl":
        if checksums:
            raise TransferError("kv_transfer.checksums: not supported with backend nixl (its reads land in place)")
        return NixlConnector(worker_id)
    if backend == "ipc":
        if checksums:
            raise TransferError("kv_transfer.checksums: not supported with backend ipc (its copies land in place)")
        return IpcConnector(worker_id)
    return TorchDistConnector(worker_id, backend, checksums=checksums)
