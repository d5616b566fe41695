"""`control_plane.processes`: ending a process and everything it started, zombies included."""

import subprocess
import sys
import time

import psutil

from pdserve.control_plane.processes import _wait_ended, alive, end_tree

PARENT = """
import subprocess, sys, time
child = subprocess.Popen(["true"])  # exits at once; this parent never reaps it, so it stays a zombie
print(child.pid, flush=True)
time.sleep(60)
"""


def _parent_with_a_zombie() -> tuple[subprocess.Popen, psutil.Process]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, "zombie-parent"], stdout=subprocess.PIPE, text=True)
    zombie = psutil.Process(int(parent.stdout.readline()))
    deadline = time.monotonic() + 10
    while zombie.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)
    return parent, zombie


def test_a_zombie_counts_as_ended_and_a_running_process_does_not():
    parent, zombie = _parent_with_a_zombie()
    try:
        assert zombie.status() == psutil.STATUS_ZOMBIE
        assert _wait_ended([zombie], timeout_s=0) == []
        assert _wait_ended([psutil.Process(parent.pid)], timeout_s=0) == [psutil.Process(parent.pid)]
    finally:
        parent.kill()
        parent.wait()


def test_end_tree_ends_a_process_whose_child_is_a_zombie_and_leaves_no_runner():
    parent, zombie = _parent_with_a_zombie()
    end_tree(parent.pid, "zombie-parent", grace_s=5, what="test parent")
    assert parent.poll() is not None  # reaped by end_tree: it is this process's child
    assert not alive(zombie.pid)


def test_end_tree_leaves_a_process_that_is_not_the_one_named_alone():
    parent, _ = _parent_with_a_zombie()
    try:
        end_tree(parent.pid, "something-else", grace_s=0.1)
        assert parent.poll() is None
    finally:
        parent.kill()
        parent.wait()
