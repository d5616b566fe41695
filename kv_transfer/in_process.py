"""A connector for two engines in one process: blocks are copied through a shared exchange.

For tests and the simulator. `Exchange` pairs sends with receives by (sender, receiver, tag); a send whose receive
has not been posted yet waits in the exchange (as a real transport buffers it); a cancelled receive still takes its
send off the wire (as the torch.distributed connector discards it). `fail_next(worker)` makes that
worker's next transfer fail, to test the failure paths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer.connector import KVConnector, Transfer, TransferError, TransferResult, TransferStatus


@dataclass
class _Pending:
    transfer: Transfer
    sending: bool
    started: float


class Exchange:
    """What the in-process connectors of one test share."""

    def __init__(self) -> None:
        self.connectors: dict[str, InProcessConnector] = {}
        self.in_flight: dict[tuple[str, str, int], torch.Tensor] = {}  # (sender, receiver, tag) -> blocks
        self.discarding: set[tuple[str, str, int]] = set()
        """Cancelled receives whose send has not arrived yet: it is dropped when it does."""
        self.failing: set[str] = set()

    def fail_next(self, worker_id: str) -> None:
        self.failing.add(worker_id)


class InProcessConnector(KVConnector):
    def __init__(self, worker_id: str, exchange: Exchange) -> None:
        self.worker_id = worker_id
        self.exchange = exchange
        self.kv_cache: KVCache | None = None
        self.pending: dict[str, _Pending] = {}
        self.results: list[TransferResult] = []
        exchange.connectors[worker_id] = self

    def register(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache

    def start_send(self, transfer: Transfer) -> None:
        self._start(transfer, sending=True)
        if self._consume_failure(transfer):
            return
        key = (self.worker_id, transfer.peer, transfer.tag)
        if key in self.exchange.discarding:
            self.exchange.discarding.discard(key)
        else:
            self.exchange.in_flight[key] = self._cache().read_blocks(transfer.block_ids)
        self._finish(transfer.transfer_id, TransferStatus.DONE)

    def start_recv(self, transfer: Transfer) -> None:
        self._start(transfer, sending=False)
        self._consume_failure(transfer)

    def poll(self) -> list[TransferResult]:
        now = time.monotonic()
        for transfer_id, p in list(self.pending.items()):
            key = (p.transfer.peer, self.worker_id, p.transfer.tag)
            if key in self.exchange.in_flight:
                data = self.exchange.in_flight.pop(key)
                if data.shape[2] == 0 and p.transfer.block_ids:
                    self._finish(transfer_id, TransferStatus.FAILED, "the sender aborted (no KV)")
                    continue
                if data.shape[2] != len(p.transfer.block_ids):
                    self._finish(transfer_id, TransferStatus.FAILED, f"sent {data.shape[2]} blocks, expected "
                                                                    f"{len(p.transfer.block_ids)}")
                    continue
                self._cache().write_blocks(p.transfer.block_ids, data)
                self._finish(transfer_id, TransferStatus.DONE, nbytes=data.numel() * data.element_size())
            elif now - p.started > p.transfer.timeout_s:
                self._finish(transfer_id, TransferStatus.TIMED_OUT, f"no data within {p.transfer.timeout_s} s")
        results, self.results = self.results, []
        return results

    def cancel(self, transfer_id: str) -> None:
        p = self.pending.get(transfer_id)
        if p is None:
            return
        if not p.sending:
            key = (p.transfer.peer, self.worker_id, p.transfer.tag)
            if self.exchange.in_flight.pop(key, None) is None:
                self.exchange.discarding.add(key)
        self._finish(transfer_id, TransferStatus.CANCELLED)

    def discard(self, peer: str, tag: int) -> None:
        key = (peer, self.worker_id, tag)
        if self.exchange.in_flight.pop(key, None) is None:
            self.exchange.discarding.add(key)

    def shutdown(self) -> None:
        self.pending.clear()
        self.exchange.connectors.pop(self.worker_id, None)

    def _start(self, transfer: Transfer, sending: bool) -> None:
        if transfer.transfer_id in self.pending:
            raise TransferError(f"transfer {transfer.transfer_id!r} is already under way")
        if transfer.peer not in self.exchange.connectors:
            raise TransferError(f"unknown peer {transfer.peer!r}")
        self.pending[transfer.transfer_id] = _Pending(transfer, sending, time.monotonic())

    def _consume_failure(self, transfer: Transfer) -> bool:
        if self.worker_id not in self.exchange.failing:
            return False
        self.exchange.failing.discard(self.worker_id)
        self._finish(transfer.transfer_id, TransferStatus.FAILED, "injected failure")
        return True

    def _finish(self, transfer_id: str, status: TransferStatus, error: str = "", nbytes: int = 0) -> None:
        p = self.pending.pop(transfer_id)
        self.results.append(TransferResult(transfer_id, status, error, time.monotonic() - p.started, nbytes))

    def _cache(self) -> KVCache:
        if self.kv_cache is None:
            raise TransferError(f"{self.worker_id}: register a KV cache before transferring")
        return self.kv_cache
