"""`kv_transfer.backend: auto`: each KV pair over the fastest way its two workers share. Workers of one node pair
over IPC (`ipc_connector`: CUDA IPC between GPUs, shared memory between CPU caches); the others over the network
(gloo for CPU caches, NCCL for CUDA ones: `torch_dist`). The choice is made at pairing, the same on both sides:

    both can share their cache (ipc registered)  --no-->  network
        | yes
    ipc pairing: same node, each maps the other's cache  --IpcUnavailable, on both sides-->  network
        | yes
    ipc

A worker whose cache cannot be shared (/dev/shm too small in its container) pairs over the network only, and says
so once at start. With `kv_transfer.checksums` every pair goes over the network, which is what checksums check.
Transfers go to the connector of their peer's pair; `poll` gathers both.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer.connector import PairedConnector, Transfer, TransferError, TransferResult
from pdserve.kv_transfer.ipc_connector import IpcConnector, IpcUnavailable
from pdserve.kv_transfer.send_delay import SendDelay
from pdserve.kv_transfer.torch_dist import TorchDistConnector

log = logging.getLogger(__name__)


class PerPairConnector(PairedConnector):
    streams_layers = True
    """Network pairs stream layer by layer; a layer-wise send to an IPC pair waits for the whole KV, then goes."""

    def __init__(self, worker_id: str, checksums: bool = False) -> None:
        self.checksums = checksums
        self.ipc: IpcConnector | None = None
        self.network: TorchDistConnector | None = None
        super().__init__(worker_id)
        self._owners: dict[str, PairedConnector] = {}
        """The connector of each transfer under way, by its id."""

    # the worker sets these after `register`; each goes on to both connectors
    @property
    def send_delay(self) -> SendDelay | None:
        return self._send_delay

    @send_delay.setter
    def send_delay(self, delay: SendDelay | None) -> None:
        self._send_delay = delay
        for connector in self._connectors():
            connector.send_delay = delay

    @property
    def model_fingerprint(self) -> str:
        return self._fingerprint

    @model_fingerprint.setter
    def model_fingerprint(self, fingerprint: str) -> None:
        self._fingerprint = fingerprint
        for connector in self._connectors():
            connector.model_fingerprint = fingerprint

    def register(self, kv_cache: KVCache) -> None:
        device = kv_cache.tensor.device
        if not self.checksums:
            self.ipc = IpcConnector(self.worker_id)
            try:
                self.ipc.register(kv_cache)  # first: on CPU it moves the cache into shared memory
            except TransferError as e:
                log.warning("worker %s: KV pairs on this node go over the network (%s)", self.worker_id, e)
                self.ipc = None
        self.network = TorchDistConnector(self.worker_id, "nccl" if device.type == "cuda" else "gloo",
                                          checksums=self.checksums)
        self.network.register(kv_cache)
        self.send_delay, self.model_fingerprint = self._send_delay, self._fingerprint

    def connect(self, peer: str, store: dist.Store, rank: int, timeout_s: float = 60.0, generation: int = 0) -> None:
        if self.network is None:
            raise TransferError(f"{self.worker_id}: register a KV cache before pairing")
        self.disconnect(peer)  # a pair formed before with this peer goes first, whichever way it went
        name = self.pair_name(peer, generation)
        store.set(f"pdserve/route/{name}/{rank}", "ipc" if self.ipc is not None else "network")
        connector: PairedConnector = self.network
        if self.ipc is not None and store.get(f"pdserve/route/{name}/{1 - rank}") == b"ipc":
            try:
                self.ipc.connect(peer, store, rank, timeout_s, generation)
                connector = self.ipc
            except IpcUnavailable as e:
                log.info("%s; it goes over the network", e)
        if connector is self.network:
            self.network.connect(peer, store, rank, timeout_s, generation)
        self.pairs = {**self.pairs, peer: connector}
        log.info("KV pair %s <-> %s over %s", self.worker_id, peer, connector.transport(peer))

    def disconnect(self, peer: str) -> None:
        connector = self.pairs.get(peer)
        if connector is not None:
            connector.disconnect(peer)
            self.pairs = {p: c for p, c in self.pairs.items() if p != peer}

    def start_send(self, transfer: Transfer) -> None:
        self._route(transfer).start_send(transfer)
        self._owners[transfer.transfer_id] = self.pairs[transfer.peer]

    def start_recv(self, transfer: Transfer) -> None:
        self._route(transfer).start_recv(transfer)
        self._owners[transfer.transfer_id] = self.pairs[transfer.peer]

    def poll(self) -> list[TransferResult]:
        reported = [result for connector in self._connectors() for result in connector.poll()]
        for result in reported:
            self._owners.pop(result.transfer_id, None)
        self.pairs = {p: c for p, c in self.pairs.items() if p in c.pairs}  # a broken pair left its connector
        return reported

    def cancel(self, transfer_id: str) -> None:
        connector = self._owners.get(transfer_id)
        if connector is not None:
            connector.cancel(transfer_id)

    def discard(self, peer: str, tag: int) -> None:
        connector = self.pairs.get(peer)
        if connector is None:
            raise TransferError(f"{self.worker_id}: no pair with peer {peer!r}")
        connector.discard(peer, tag)

    def shutdown(self) -> None:
        for connector in self._connectors():
            connector.shutdown()
        self.pairs = {}
        self._owners.clear()

    def transport(self, peer: str) -> str:
        connector = self.pairs.get(peer)
        return "" if connector is None else connector.transport(peer)

    def _route(self, transfer: Transfer) -> PairedConnector:
        if transfer.transfer_id in self._owners:
            raise TransferError(f"transfer {transfer.transfer_id!r} is already under way")
        connector = self.pairs.get(transfer.peer)
        if connector is None:
            raise TransferError(f"{self.worker_id}: no pair with peer {transfer.peer!r}; connect first")
        return connector

    def _connectors(self) -> list[PairedConnector]:
        return [c for c in (self.ipc, self.network) if c is not None]
