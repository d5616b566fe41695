"""How far one step's forward pass has come, layer by layer: what layer-wise KV streaming waits on.

A prefill worker that streams (`kv_transfer.layerwise`) starts a request's KV transfer when the engine schedules the
request's last prompt chunk (`Engine.on_final_chunk`), before the step runs. The engine thread marks each layer as
the model finishes it (its KV for the chunk is then written); the transfer thread sends a layer's KV once it is
marked, so the wire runs beside the rest of the step instead of after it.

    progress = LayerProgress(num_layers, device)     # returned by the hook, for one request
    progress.layer_done(i)                            # engine thread, after layer i (CUDA: an event on its stream)
    event = progress.wait(i, deadline)                # transfer thread: returns once layer i is done
    progress.abandon()                                # the step raised: waiters get LayerAbandoned

On a GPU the host marks a layer when it has queued the layer's kernels: `wait` returns the CUDA event recorded
then, and the transfer's stream waits on it (on the device) before it reads the layer's blocks.
"""

from __future__ import annotations

import threading
import time

import torch


class LayerAbandoned(RuntimeError):
    """The step that was computing the layers raised: they will not be done."""


class LayerProgress:
    def __init__(self, layers: int, device: torch.device | str = "cpu") -> None:
        self.layers = layers
        self._device = torch.device(device)
        self._done = 0
        self._abandoned = False
        self._events: list[torch.cuda.Event] = []
        self._changed = threading.Condition()

    @property
    def complete(self) -> bool:
        return self._done >= self.layers

    def layer_done(self, index: int) -> None:
        if self._device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._device))
            self._events.append(event)
        with self._changed:
            self._done = max(self._done, index + 1)
            self._changed.notify_all()

    def abandon(self) -> None:
        with self._changed:
            self._abandoned = True
            self._changed.notify_all()

    def wait(self, index: int, deadline: float) -> torch.cuda.Event | None:
        """Block until layer `index` is done; its CUDA event (None on a CPU). TimeoutError past `deadline`."""
        with self._changed:
            while self._done <= index and not self._abandoned:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"layer {index} of {self.layers} was not computed by the transfer's deadline")
                self._changed.wait(left)
            if self._done <= index:
                raise LayerAbandoned(f"the step computing layer {index} of {self.layers} raised")
        return self._events[index] if self._events else None
