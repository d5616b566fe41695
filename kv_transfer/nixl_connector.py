"""KV handoff over NIXL, the transfer library NVIDIA Dynamo, vLLM and SGLang share (`kv_transfer.backend: nixl`;
`pip install 'pdserve[nixl]'`). UCX underneath picks the wire: shared memory or CMA on one host, TCP or RDMA
across hosts; CUDA memory where the cache lives on a GPU.

Each worker registers its whole KV cache with its NIXL agent once. At pairing both workers put their agent's
metadata and their cache's address and size in the pair's store and check each other's KV layout
(`kv_transfer.layout`). The protocol is `one_sided`'s: here a notice is a NIXL notification, and a READ is one NIXL
transfer with one descriptor per (K or V, layer, run of blocks consecutive on both sides), whose own completion
notification tells the sender "done". Everything runs in `poll`, which also drives UCX's progress (no progress
thread spinning beside the engine).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer.connector import TransferError
from pdserve.kv_transfer.layout import agree
from pdserve.kv_transfer.one_sided import OneSidedConnector, ReadState, Receive, common_runs


def load_nixl() -> Any:
    """NIXL's Python API, or a TransferError saying how to install it."""
    try:
        return importlib.import_module("nixl._api")
    except ImportError as e:
        raise TransferError("kv_transfer.backend: nixl needs the nixl package (pip install 'pdserve[nixl]')") from e


@dataclass(frozen=True)
class _Peer:
    name: str
    base: int
    """Its KV cache's address, in its process."""
    num_blocks: int


class NixlConnector(OneSidedConnector):
    def __init__(self, worker_id: str) -> None:
        super().__init__(worker_id)
        self._api = load_nixl()
        # no progress thread: UCX's would spin on a core the engine needs (2.5x slower handoffs on the dev box);
        # transfers progress in `poll`, which the worker calls after every step
        config = self._api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
        self._agent = self._api.nixl_agent(worker_id, config)
        self.pairs: dict[str, _Peer] = {}
        self._registered: Any = None

    def register(self, kv_cache: KVCache) -> None:
        super().register(kv_cache)
        self._registered = self._agent.register_memory(kv_cache.tensor)

    def connect(self, peer: str, store: dist.Store, rank: int, timeout_s: float = 60.0, generation: int = 0) -> None:
        name = self.pair_name(peer, generation)
        agree(dist.PrefixStore(f"pdserve/kv-layout/{name}", store), rank, self.layout, self.worker_id, peer)
        pair_store = dist.PrefixStore(f"pdserve/nixl/{name}", store)
        cache = self._cache().tensor
        pair_store.set(f"agent/{rank}", self._agent.get_agent_metadata())
        pair_store.set(f"cache/{rank}", json.dumps({"base": cache.data_ptr(), "num_blocks": cache.shape[2]}))
        if peer in self.pairs:
            self._agent.remove_remote_agent(peer)
        remote = self._agent.add_remote_agent(pair_store.get(f"agent/{1 - rank}"))
        geometry = json.loads(pair_store.get(f"cache/{1 - rank}"))
        self.pairs[peer] = _Peer(remote.decode() if isinstance(remote, bytes) else remote, geometry["base"],
                                 geometry["num_blocks"])

    def disconnect(self, peer: str) -> None:
        if self.pairs.pop(peer, None) is not None:
            self._agent.remove_remote_agent(peer)

    def transport(self, peer: str) -> str:
        return "nixl"

    def shutdown(self) -> None:
        super().shutdown()
        if self._registered is not None:
            self._agent.deregister_memory(self._registered)
            self._registered = None

    # ---- the transport -----------------------------------------------------------------------------------------
    def _notify(self, peer: str, notice: dict) -> None:
        if peer in self.pairs:
            self._agent.send_notif(self.pairs[peer].name, json.dumps(notice).encode())

    def _new_notices(self) -> list[tuple[str, dict]]:
        return [(peer, json.loads(message)) for peer, messages in self._agent.get_new_notifs().items()
                for message in messages]

    def _begin_read(self, receive: Receive) -> Any:
        t, peer = receive.transfer, self.pairs[receive.transfer.peer]
        local, remote = self._descriptors(t.block_ids, receive.source, peer)
        kind = "VRAM" if self._cache().tensor.device.type == "cuda" else "DRAM"
        handle = self._agent.initialize_xfer(
            "READ", self._agent.get_xfer_descs(local, kind), self._agent.get_xfer_descs(remote, kind), peer.name,
            json.dumps({"op": "done", "tag": t.tag}).encode())  # NIXL tells the sender when the READ completes
        if self._agent.transfer(handle) == "ERR":
            self._agent.release_xfer_handle(handle)
            raise TransferError("NIXL refused the read")
        return handle

    def _read_state(self, handle: Any) -> tuple[ReadState, str]:
        state = self._agent.check_xfer_state(handle)
        if state == "PROC":
            return ReadState.MOVING, ""
        if state == "DONE":
            return ReadState.DONE, ""
        return ReadState.FAILED, f"NIXL read ended {state}"

    def _release_read(self, handle: Any) -> None:
        self._agent.release_xfer_handle(handle)

    def _descriptors(self, local_ids: tuple[int, ...], remote_ids: tuple[int, ...],
                     peer: _Peer) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """(address, bytes, device) per (K or V, layer, run of blocks consecutive on both sides), both lists in one
        order."""
        cache = self._cache().tensor  # [2, L, blocks, block_size, H_kv, D]
        layers, mine = cache.shape[1], cache.shape[2]
        block = cache[0, 0, 0].numel() * cache.element_size()
        device = cache.device.index or 0
        local, remote = [], []
        for first, count in common_runs(local_ids, remote_ids):
            for kv in (0, 1):
                for layer in range(layers):
                    row = kv * layers + layer
                    local.append((cache.data_ptr() + (row * mine + local_ids[first]) * block, count * block, device))
                    remote.append((peer.base + (row * peer.num_blocks + remote_ids[first]) * block, count * block,
                                   device))
        return local, remote
