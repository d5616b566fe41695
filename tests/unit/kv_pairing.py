"""Helpers for connector tests with two real ends in one process: pair them as two workers do, and gather what they
report."""

import threading
import time

import torch.distributed as dist

from pdserve.kv_transfer.connector import PairedConnector, TransferResult
from pdserve.kv_transfer.layout import PairRefused


def join(first: PairedConnector, second: PairedConnector, timeout_s: float = 20.0,
         generation: int = 0) -> list[PairRefused]:
    """Connect both over one store (a thread each, ranks 0 and 1, as two workers do); returns what each raised."""
    store, errors = dist.HashStore(), []

    def connect(side: PairedConnector, peer: str, rank: int) -> None:
        try:
            side.connect(peer, store, rank, timeout_s=timeout_s, generation=generation)
        except PairRefused as e:
            errors.append(e)

    threads = [threading.Thread(target=connect, args=(first, second.worker_id, 0)),
               threading.Thread(target=connect, args=(second, first.worker_id, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 10)
    return errors


def outcomes(*sides: PairedConnector, count: int, limit_s: float = 20.0) -> dict[tuple[str, str], TransferResult]:
    """(worker id, transfer id) -> result, polling every side until `count` results or `limit_s`; fails a transfer
    reported twice."""
    found: dict[tuple[str, str], TransferResult] = {}
    deadline = time.monotonic() + limit_s
    while len(found) < count and time.monotonic() < deadline:
        for side in sides:
            for result in side.poll():
                key = (side.worker_id, result.transfer_id)
                assert key not in found, f"{key} reported twice"
                found[key] = result
        time.sleep(0.002)
    return found
