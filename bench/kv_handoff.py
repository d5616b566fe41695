"""Benchmark: KV handoff through our connector vs a raw torch.distributed send/recv of the same bytes.

    python -m pdserve.bench.kv_handoff [--backend gloo|nixl|ipc] [--blocks 16 64 128] [--repeats 5]

Two processes on loopback (this one sends, a child receives), one gloo pair group (and, with --backend nixl or ipc, a
NIXL or same-node IPC pair beside it: ours then goes over that, raw stays gloo's; with ipc a third figure, "copy",
is one process copying the same bytes from one tensor into another, what a same-node move cannot beat). Each round,
the sender times
from the start of the send until the receiver's 1-element acknowledgement arrives; the receiver acknowledges once
the data is in place: in its buffer (raw, one message), or in its KV blocks (ours). Ours moves the blocks twice:
consecutive on both sides (sent and received in place, the common case) and scattered (every other block on both
sides: gathered by the sender, staged and copied by the receiver). KV shape: SmolLM2-135M (30 layers, 3 KV heads,
head dim 64), 16-token blocks, fp32: 720 KiB a block. Reports GB/s (median of the repeats) and ours / raw.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from pdserve.engine.kv_cache import KVCache
from pdserve.engine.shapes import shape
from pdserve.kv_transfer.backends import make_connector
from pdserve.kv_transfer.connector import PairedConnector, Transfer, TransferStatus
from pdserve.kv_transfer.torch_dist import TorchDistConnector

ACK_TAG = 1_000_000
WAYS = ("raw", "consecutive", "scattered")


def block_ids(way: str, n: int) -> tuple[int, ...]:
    return tuple(range(n)) if way == "consecutive" else tuple(range(0, 2 * n, 2))


def cache(num_blocks: int) -> KVCache:
    return KVCache(shape("smollm2-135m"), num_blocks=num_blocks, block_size=16, dtype=torch.float32, device="cpu")


def finish(connector: PairedConnector, transfer_id: str) -> None:
    while True:
        for result in connector.poll():
            if result.status is not TransferStatus.DONE:
                raise RuntimeError(f"transfer {transfer_id}: {result.status.value} {result.error}")
            return
        time.sleep(0.0002)


def rounds(gloo: TorchDistConnector, connector: PairedConnector, kv: KVCache, sizes: list[int], repeats: int,
           sending: bool) -> dict:
    peer = "receiver" if sending else "sender"
    pair = gloo.pairs[peer]
    ack = torch.zeros(1)
    timings: dict[tuple[str, int], list[float]] = {}
    tag = 0
    for n in sizes:
        raw = torch.ones(kv.read_blocks(range(n)).shape) if sending else torch.empty(kv.read_blocks(range(n)).shape)
        for _ in range(repeats):
            for way in WAYS:
                tag += 1
                start = time.perf_counter()
                if way == "raw":
                    op = pair.group.send if sending else pair.group.recv
                    op([raw], pair.peer_rank, tag).wait()
                else:
                    transfer = Transfer(f"t{tag}", peer, block_ids(way, n), tag)
                    (connector.start_send if sending else connector.start_recv)(transfer)
                    finish(connector, transfer.transfer_id)
                if sending:
                    pair.group.recv([ack], pair.peer_rank, ACK_TAG + tag).wait()
                    timings.setdefault((way, n), []).append(time.perf_counter() - start)
                else:
                    pair.group.send([ack], pair.peer_rank, ACK_TAG + tag).wait()
    return timings


def run_side(port: int, sizes: list[int], repeats: int, backend: str, sending: bool,
             store: dist.Store | None = None) -> dict:
    torch.set_num_threads(1)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    me, peer, rank = ("sender", "receiver", 0) if sending else ("receiver", "sender", 1)
    gloo = TorchDistConnector(me, "gloo")
    kv = cache(2 * max(sizes))
    ours: PairedConnector = gloo
    if backend != "gloo":
        ours = make_connector(me, backend)
        ours.register(kv)  # first: ipc moves the cache into shared memory
    gloo.register(kv)
    gloo.connect(peer, store, rank)
    if ours is not gloo:
        ours.connect(peer, store, rank, generation=1)
    timings = rounds(gloo, ours, kv, sizes, repeats, sending)
    for connector in {gloo, ours}:
        connector.shutdown()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nixl", "ipc"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer is not None:
        run_side(args.peer, args.blocks, args.repeats, args.backend, sending=False)
        return
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=60), wait_for_workers=False)
    child = subprocess.Popen([sys.executable, "-m", "pdserve.bench.kv_handoff", "--peer", str(store.port),
                              "--backend", args.backend, "--repeats", str(args.repeats),
                              "--blocks", *map(str, args.blocks)])
    timings = run_side(0, args.blocks, args.repeats, args.backend, sending=True, store=store)
    child.wait(timeout=120)
    block_bytes = cache(1).tensor.numel() * 4
    print(f"{args.backend}, two processes on 127.0.0.1, SmolLM2 KV blocks of {block_bytes / 2**10:.0f} KiB")
    copies = {n: copy_rate(n * block_bytes, args.repeats) for n in args.blocks} if args.backend == "ipc" else {}
    print(f"{'blocks':>6s} {'MiB':>7s} {'raw GB/s':>9s} {'consecutive':>12s} {'/raw':>5s} {'scattered':>10s} "
          f"{'/raw':>5s}" + (f" {'copy GB/s':>10s} {'consecutive/copy':>17s}" if copies else ""))
    for n in args.blocks:
        nbytes = n * block_bytes
        raw, consecutive, scattered = (nbytes / statistics.median(timings[(way, n)]) / 1e9 for way in WAYS)
        line = (f"{n:6d} {nbytes / 2**20:7.1f} {raw:9.2f} {consecutive:12.2f} {consecutive / raw:5.2f} "
                f"{scattered:10.2f} {scattered / raw:5.2f}")
        if copies:
            line += f" {copies[n]:10.2f} {consecutive / copies[n]:17.2f}"
        print(line)


def copy_rate(nbytes: int, repeats: int) -> float:
    """GB/s of one process copying `nbytes` from one tensor into another (median of `repeats`)."""
    source, target = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    target.copy_(source)  # both touched once, as a cache's pages are
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        seconds.append(time.perf_counter() - start)
    return nbytes / statistics.median(seconds) / 1e9


if __name__ == "__main__":
    main()
