"""The one thread that owns a worker's engine.

A worker's asyncio methods never touch the engine: they hand a function to `call`, which runs it on this thread
between two steps and returns a concurrent Future (await it with `asyncio.wrap_future`). The loop is

    run queued commands -> step the engine if it has work -> the role's `after_step(outputs)` -> sleep if idle

so the engine needs no locks. The thread pins itself to the worker's cores before torch starts its own threads
(which inherit the pinning), so a prefill and a decode worker on one machine do not fight over cores.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import torch

from pdserve.engine.engine import Engine
from pdserve.engine.engine_load import EngineLoad
from pdserve.engine.request import RequestOutput

log = logging.getLogger(__name__)

T = TypeVar("T")
IDLE_WAIT_S = 0.002


class EngineThread:
    def __init__(self, build: Callable[[], Engine], after_step: Callable[[Engine, list[RequestOutput]], None],
                 cores: tuple[int, ...] = (), name: str = "engine",
                 on_step: Callable[[Engine, list[RequestOutput], float], None] | None = None) -> None:
        """`after_step` runs on this thread after every step (with the step's outputs, maybe none); `on_step` (the
        worker's metrics) before it, only after a step that ran, with how long `engine.step()` took."""
        self._build = build
        self._after_step = after_step
        self._on_step = on_step
        self._cores = cores
        self._inbox: queue.SimpleQueue[tuple[Callable[[Engine], object], Future]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._closed = False
        """Set, under `_lock`, once the thread takes no more commands; `call` checks it under the same lock, so a
        command is either queued before the pending ones are failed, or refused."""
        self._closed_by: BaseException | None = None
        """What ended the thread (a failed build, or `failure`); None when it was stopped."""
        self._lock = threading.Lock()
        self._ready: Future[Engine] = Future()
        self.load: EngineLoad | None = None
        """The engine's load after the latest step; read from any thread."""
        self.step_started = 0.0
        """time.monotonic() when the latest step began (for `after_step` to time what ran in it)."""
        self._cycle_began: float | None = None
        """time.monotonic() when the cycle in progress began (None between cycles): see `stalled_s`."""
        self.failure: Exception | None = None
        """What ended the thread when a step or `after_step` raised (the worker must then be replaced)."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Future[Engine]:
        """Builds the engine on the thread; the future resolves when it is ready (or with the build's error). On a
        thread already started, the same future (a worker switching roles keeps its engine)."""
        if not self._thread.is_alive() and not self._ready.done():
            self._thread.start()
        return self._ready

    def attach(self, after_step: Callable[[Engine, list[RequestOutput]], None],
               on_step: Callable[[Engine, list[RequestOutput], float], None] | None) -> Future[None]:
        """Hand the steps to another role's callbacks (a role switch in place); takes effect between two steps."""
        def swap(_: Engine) -> None:
            self._after_step, self._on_step = after_step, on_step
        return self.call(swap)

    def call(self, fn: Callable[[Engine], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if not (self._closed or self._stopping.is_set() or self.failure is not None):
                self._inbox.put((fn, future))
                return future
        future.set_exception(self._stopped())
        return future

    def stalled_s(self) -> float:
        """How long the thread has been inside its current cycle (a step, or commands between steps): a cycle takes
        milliseconds to seconds, so one that lasts far longer means the engine is hung (`control_plane.hang_watch`)."""
        began = self._cycle_began
        return time.monotonic() - began if began is not None and self.failure is None else 0.0

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # ---- on the engine thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            engine = self._start_engine()
        except BaseException as e:  # reported to whoever awaits start(), and to commands sent meanwhile
            self._ready.set_exception(e)
            self._close(e)
            return
        self._ready.set_result(engine)
        try:
            while not self._stopping.is_set():
                self._cycle_began = time.monotonic()
                self._cycle(engine)
                self._cycle_began = None
        except Exception as e:  # a bug in a step or a role's callback: this engine's state can no longer be trusted
            log.critical("engine thread %s died", self._thread.name, exc_info=True)
            self.failure = e
        self._close(self.failure)

    def _cycle(self, engine: Engine) -> None:
        # Nothing to compute: wait for a command up to IDLE_WAIT_S (transfers in flight are polled that often).
        self._run_commands(engine, wait=not engine.has_unfinished())
        self.step_started = time.monotonic()
        stepped = engine.has_unfinished()
        outputs = engine.step() if stepped else []
        if stepped and self._on_step is not None:
            self._on_step(engine, outputs, time.monotonic() - self.step_started)
        self._after_step(engine, outputs)
        self.load = engine.load()

    def _start_engine(self) -> Engine:
        if self._cores:
            os.sched_setaffinity(0, self._cores)  # this thread; torch's pool threads inherit it
            torch.set_num_threads(len(self._cores))
        engine = self._build()
        self.load = engine.load()
        return engine

    def _run_commands(self, engine: Engine, wait: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_S) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(engine))
                except Exception as e:  # the caller gets the error; the engine goes on
                    future.set_exception(e)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _close(self, cause: BaseException | None) -> None:
        """Take no more commands, and fail those still queued (with `cause`, what ended the thread, if any)."""
        with self._lock:
            self._closed, self._closed_by = True, cause
        while True:
            try:
                _, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(self._stopped())

    def _stopped(self) -> RuntimeError:
        cause = self._closed_by or self.failure
        if cause is not None:
            return RuntimeError(f"the engine thread died: {type(cause).__name__}: {cause}")
        return RuntimeError("the engine thread has stopped")
