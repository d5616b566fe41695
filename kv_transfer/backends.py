"""The connector a worker uses, by `kv_transfer.backend`: gloo (CPU tensors) or nccl (CUDA tensors) through
torch.distributed, nixl (either, through NIXL over UCX), ipc (either, between workers of one node), or auto (ipc for
pairs on one node, gloo or nccl for the others)."""

from __future__ import annotations

from pdserve.kv_transfer.connector import PairedConnector, TransferError
from pdserve.kv_transfer.ipc_connector import IpcConnector
from pdserve.kv_transfer.nixl_connector import NixlConnector
from pdserve.kv_transfer.per_pair import PerPairConnector
from pdserve.kv_transfer.torch_dist import TorchDistConnector

BACKENDS = ("gloo", "nccl", "nixl", "ipc", "auto")


def make_connector(worker_id: str, backend: str, checksums: bool = False) -> PairedConnector:
    if backend == "nixl":
        if checksums:
            raise TransferError("kv_transfer.checksums: not supported with backend nixl (its reads land in place)")
        return NixlConnector(worker_id)
    if backend == "ipc":
        if checksums:
            raise TransferError("kv_transfer.checksums: not supported with backend ipc (its copies land in place)")
        return IpcConnector(worker_id)
    if backend == "auto":
        return PerPairConnector(worker_id, checksums=checksums)
    return TorchDistConnector(worker_id, backend, checksums=checksums)
