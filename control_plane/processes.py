"""Processes the control plane starts and must be able to end whole: a process and everything it started.

    alive(pid, "redis-server")           # is it running (not a zombie), and is it what we started?
    end_tree(pid, "ray", grace_s=5)      # SIGTERM to it and its descendants, SIGKILL what is left after grace_s

A pid from a state file may have been given to another process since: every check names a word of the command line
the process was started with, and a process without it is left alone.

A Ray head's workers are children of its raylet but in process groups of their own, so ending a process group is not
enough: the tree is walked (psutil) before anything is signalled.

A process that has exited counts as ended even while it is a zombie: its parent (Ray's raylet, itself ended) may be
gone, and where the init process does not reap orphans (some containers' PID 1) a zombie stays for good. Waiting for
it to vanish waited out the whole grace period on every stop.
"""

from __future__ import annotations

import logging
import signal
import time

import psutil

log = logging.getLogger(__name__)


def alive(pid: int | None, expect: str = "") -> bool:
    """`pid` runs (not a zombie) and its command line contains `expect`."""
    return _process(pid, expect) is not None


def end_tree(pid: int | None, expect: str, grace_s: float = 5.0, what: str = "process",
             kill_log_level: int = logging.WARNING) -> None:
    """End `pid` (if it runs `expect`) and all its descendants: SIGTERM, then SIGKILL for whatever still runs after
    `grace_s` (said in the log at `kill_log_level`)."""
    root = _process(pid, expect)
    if root is None:
        return
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    _signal(tree, signal.SIGTERM)
    left = _wait_ended(tree, grace_s)
    if left:
        log.log(kill_log_level, "%s (pid %d): %d processes still up %.0f s after SIGTERM; killing them", what, pid,
                len(left), grace_s)
        _signal(left, signal.SIGKILL)
        _wait_ended(left, grace_s)


def _process(pid: int | None, expect: str) -> psutil.Process | None:
    if not pid:
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or expect not in " ".join(process.cmdline()):
            return None
        return process
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


WAIT_POLL_S = 0.05


def _wait_ended(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait up to `timeout_s` for every process to exit (gone, or a zombie); returns those still running."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = [p for p in processes if _running(p)]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(WAIT_POLL_S)


def _running(process: psutil.Process) -> bool:
    """Not exited; a child of this process that has exited is reaped here."""
    try:
        process.wait(timeout=0)
        return False
    except psutil.TimeoutExpired:
        pass
    except psutil.NoSuchProcess:
        return False
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(processes: list[psutil.Process], sig: signal.Signals) -> None:
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
