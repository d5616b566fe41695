"""Where a KV transfer's device work runs: on a CUDA cache, a stream of its own per direction, so that no engine step
waits for a transfer and no transfer waits for an engine step; on a CPU cache, nowhere special.

    streams = TransferStreams.of(cache.tensor.device)
    written = streams.mark()                  # on the engine's thread, when the blocks to send are written
    with streams.sending(after=written):      # on the transfer thread: the gather and the sends follow the writes
        ...
        streams.settle(deadline)              # the host waits (this thread only) until the stream's work is done

NCCL's `Work.wait()` only makes the current stream wait for the operation; the host learns the outcome from an event
recorded after it, polled until the transfer's deadline (`settle`), so a peer that never answers fails the transfer
on time instead of blocking the thread forever. A receive's blocks are complete on the device once `settle` returns,
before the transfer is reported done, so the engine's stream needs no wait of its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

SETTLE_POLL_S = 0.0005


class SettleTimeout(RuntimeError):
    """The device work of a transfer did not finish by its deadline."""


class TransferStreams:
    """No streams: CPU tensors, whose transport work completes on the host."""

    @staticmethod
    def of(device: torch.device) -> TransferStreams:
        return CudaTransferStreams(device) if device.type == "cuda" else TransferStreams()

    def mark(self) -> object | None:
        """A point on the caller's stream that transfer work started later must follow."""
        return None

    @contextlib.contextmanager
    def sending(self, after: object | None = None) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def receiving(self) -> Iterator[None]:
        yield

    def settle(self, deadline: float) -> None:
        """Return once the work queued on this thread's transfer stream is done; SettleTimeout past `deadline`."""

    def follow(self, event: object | None) -> None:
        """Work queued on this thread's transfer stream from now on waits for `event` (a layer computed)."""


class CudaTransferStreams(TransferStreams):
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.send_stream = torch.cuda.Stream(device)
        self.receive_stream = torch.cuda.Stream(device)

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    @contextlib.contextmanager
    def sending(self, after: object | None = None) -> Iterator[None]:
        with torch.cuda.device(self.device), torch.cuda.stream(self.send_stream):
            if isinstance(after, torch.cuda.Event):
                self.send_stream.wait_event(after)
            yield

    @contextlib.contextmanager
    def receiving(self) -> Iterator[None]:
        with torch.cuda.device(self.device), torch.cuda.stream(self.receive_stream):
            yield

    def follow(self, event: object | None) -> None:
        if isinstance(event, torch.cuda.Event):
            torch.cuda.current_stream(self.device).wait_event(event)

    def settle(self, deadline: float) -> None:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        while not done.query():
            if time.monotonic() >= deadline:
                raise SettleTimeout("the transfer's device work did not finish by its deadline")
            time.sleep(SETTLE_POLL_S)
