"""gpu_check's KV handoff rows (issue 21): what a transfer costs on one GPU, and what it costs the engine beside it.

- channel: our connector's handoff of a llama-3-8b request's KV (1 GiB on a GPU: 512 blocks of 16 tokens, bf16)
  between two connectors in one process over the order-matching loopback transport, read from the engine's own
  cache and written in place into another (the CUDA streams, events and in-place path of `kv_transfer.channel`),
  against one device-to-device copy of the same bytes;
- CUDA IPC: the same handoff from the engine's cache to a second process through the IPC connector
  (`kv_transfer.ipc_connector`: the receiver maps the engine's cache through a CUDA IPC handle and copies the blocks
  device to device; shared memory on a CPU), timed by the sender from its send to the receiver's "done", against
  the same plain copy: what a same-GPU pair (`gpus: 0.5` each) pays;
- beside decode: the engine's decode step at batch 8 alone, and while channel handoffs run back to back beside it.
NCCL needs two GPUs and is not here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pdserve.bench.step_timing import best_of, decode_step_s
from pdserve.engine import Engine
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer.connector import KVConnector, Transfer, TransferStatus
from pdserve.kv_transfer.ipc_connector import IpcConnector
from pdserve.kv_transfer.loopback import LoopbackGroup
from pdserve.kv_transfer.torch_dist import TorchDistConnector

HANDOFF_BLOCKS_GPU = 512
HANDOFF_BLOCKS_CPU = 16
DECODE_BATCH = 8
IPC_ROUNDS = 4
"""IPC handoffs timed (the first warms up)."""
FINGERPRINT = "gpu-check"
STORE_TIMEOUT = timedelta(seconds=60)
"""How long a side of the IPC row waits for the other's keys (the store's default, 300 s, would eat the run)."""


class Handoff:
    """Two connectors over the loopback: blocks of `engine`'s cache into a second cache of the same shape."""

    def __init__(self, engine: Engine, blocks: int) -> None:
        source = engine.kv_cache
        self.target = KVCache(engine.model_config, num_blocks=blocks, block_size=source.block_size,
                              dtype=source.tensor.dtype, device=source.tensor.device)
        self.sender, self.receiver = TorchDistConnector("sender"), TorchDistConnector("receiver")
        self.sender.register(source)
        self.receiver.register(self.target)
        first, second = LoopbackGroup.pair()
        self.sender.add_pair("receiver", first, 1)
        self.receiver.add_pair("sender", second, 0)
        self.blocks = tuple(range(blocks))
        self.count = 0

    @property
    def nbytes(self) -> int:
        return self.target.tensor.numel() * self.target.tensor.element_size()

    def run(self) -> None:
        self.count += 1
        transfer_id = f"t{self.count}"
        self.receiver.start_recv(Transfer(transfer_id, "sender", self.blocks, self.count, timeout_s=60))
        self.sender.start_send(Transfer(transfer_id, "receiver", self.blocks, self.count, timeout_s=60))
        done = 0
        while done < 2:
            for side in (self.sender, self.receiver):
                for result in side.poll():
                    if result.status is not TransferStatus.DONE:
                        raise RuntimeError(f"handoff {result.status.value}: {result.error}")
                    done += 1
            time.sleep(0.0002)

    def close(self) -> None:
        self.sender.shutdown()
        self.receiver.shutdown()


def channel_row(engine: Engine, blocks: int) -> tuple[str, dict]:
    handoff = Handoff(engine, blocks)
    device = handoff.target.tensor.device
    source = engine.kv_cache.tensor[:, :, :blocks]
    try:
        handoff.run()  # warm up
        ours = best_of(3, handoff.run, device)
        same = torch.equal(handoff.target.tensor, source)
    finally:
        handoff.close()
    plain = best_of(3, lambda: handoff.target.tensor.copy_(source), device)
    gib = handoff.nbytes / 2**30
    detail = {"gib": gib, "ours_s": ours, "copy_s": plain, "ratio": plain / ours, "intact": same}
    return (f"{gib:.2f} GiB in {ours * 1e3:.1f} ms ({handoff.nbytes / ours / 1e9:.0f} GB/s), "
            f"{plain / ours:.2f}x a device copy ({plain * 1e3:.1f} ms); bytes intact: {same}"), detail


def finish(connector: KVConnector, count: int = 1, limit_s: float = 120.0) -> None:
    """Poll until `count` transfers are done; RuntimeError on any other outcome or past `limit_s`."""
    deadline = time.monotonic() + limit_s
    while count > 0:
        for result in connector.poll():
            if result.status is not TransferStatus.DONE:
                raise RuntimeError(f"handoff {result.status.value}: {result.error}")
            count -= 1
        if time.monotonic() > deadline:
            raise RuntimeError("handoff not done in time")
        time.sleep(0.0002)


def _ipc_receiver(store_path: str, model: ModelConfig, block_size: int, dtype: torch.dtype, device: str,
                  blocks: int, outbox) -> None:
    """The second process: receives IPC_ROUNDS handoffs into a cache of `blocks` blocks, then says whether its
    blocks equal the sender's."""
    cache = KVCache(model, num_blocks=blocks, block_size=block_size, dtype=dtype, device=device)
    receiver = IpcConnector("receiver")
    receiver.register(cache)
    receiver.model_fingerprint = FINGERPRINT
    store = dist.FileStore(store_path, 2)
    store.set_timeout(STORE_TIMEOUT)
    receiver.connect("sender", store, 1)
    for k in range(IPC_ROUNDS):
        receiver.start_recv(Transfer(f"t{k}", "sender", tuple(range(blocks)), k, timeout_s=60))
        finish(receiver)
    outbox.put(bool(torch.equal(cache.tensor, receiver.pairs["sender"].cache[:, :, :blocks])))
    receiver.shutdown()


def ipc_row(engine: Engine, blocks: int) -> tuple[str, dict]:
    source = engine.kv_cache
    device = source.tensor.device
    store_folder = tempfile.mkdtemp(prefix="pdserve-gpu-check-")
    store_path = os.path.join(store_folder, "store")
    context = mp.get_context("spawn")
    outbox = context.Queue()
    child = context.Process(target=_ipc_receiver, args=(store_path, engine.model_config, source.block_size,
                                                        source.tensor.dtype, str(device), blocks, outbox), daemon=True)
    child.start()
    sender = IpcConnector("sender")
    try:
        sender.register(source)  # on a CPU this moves the engine's cache into shared memory, in place
        sender.model_fingerprint = FINGERPRINT
        store = dist.FileStore(store_path, 2)
        store.set_timeout(STORE_TIMEOUT)
        sender.connect("receiver", store, 0)
        seconds = []
        for k in range(IPC_ROUNDS):
            start = time.perf_counter()
            sender.start_send(Transfer(f"t{k}", "receiver", tuple(range(blocks)), k, timeout_s=60))
            finish(sender)
            seconds.append(time.perf_counter() - start)
        same = outbox.get(timeout=120)
    finally:
        sender.shutdown()
        child.join(30)
        if child.is_alive():
            child.kill()
        shutil.rmtree(store_folder, ignore_errors=True)
    moved = source.tensor[:, :, :blocks]
    local = torch.empty_like(moved)
    plain = best_of(3, lambda: local.copy_(moved), device)
    best = min(seconds[1:])
    nbytes = moved.numel() * moved.element_size()
    detail = {"gib": nbytes / 2**30, "ipc_s": best, "copy_s": plain, "ratio": plain / best, "intact": same}
    return (f"{nbytes / 2**30:.2f} GiB in {best * 1e3:.1f} ms ({nbytes / best / 1e9:.0f} GB/s), "
            f"{plain / best:.2f}x a copy in one process; bytes intact: {same}"), detail


def beside_decode_row(engine: Engine, blocks: int) -> tuple[str, dict]:
    cfg = engine.model_config
    on_gpu = engine.kv_cache.tensor.device.type == "cuda"
    prompt_len, tokens = (128, 32) if on_gpu else (16, 6)  # a CPU runs this only to keep the code from rotting
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, cfg.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(DECODE_BATCH)]
    decode_step_s(engine, prompts, 4)  # warm up
    alone = decode_step_s(engine, prompts, tokens)
    handoff, stop = Handoff(engine, blocks), threading.Event()

    def transfer_loop() -> None:
        while not stop.is_set():
            handoff.run()

    mover = threading.Thread(target=transfer_loop, daemon=True)
    mover.start()
    try:
        beside = decode_step_s(engine, prompts, tokens)
    finally:
        stop.set()
        mover.join(60)
        handoff.close()
    detail = {"alone_ms": alone * 1e3, "beside_ms": beside * 1e3, "slowdown": beside / alone,
              "handoffs": handoff.count}
    return (f"{alone * 1e3:.2f} ms/step alone, {beside * 1e3:.2f} ms/step beside {handoff.count} handoffs "
            f"({beside / alone:.2f}x)"), detail


def handoff_blocks(engine: Engine) -> int:
    wanted = HANDOFF_BLOCKS_GPU if engine.kv_cache.tensor.device.type == "cuda" else HANDOFF_BLOCKS_CPU
    return min(wanted, engine.kv_cache.num_blocks // 4)
