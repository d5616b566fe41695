"""A local pair's rendezvous folder: made with its owner's pid, removed on close, and removed by the next worker to
host when its owner died without closing it."""

import os
import subprocess
import sys

from pdserve.kv_transfer.rendezvous import OWNER_FILE, Rendezvous, remove_orphaned_folders

NAMESPACE = os.readlink("/proc/self/ns/pid")


def folder(parent, name: str, owner: int | None, namespace: str = NAMESPACE) -> str:
    path = parent / name
    path.mkdir()
    if owner is not None:
        (path / OWNER_FILE).write_text(f"{owner} {namespace}")
    return str(path)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_folders_whose_owner_is_gone_are_removed(tmp_path):
    orphan = folder(tmp_path, "pdserve-kv-decode-0-abc", dead_pid())
    live = folder(tmp_path, "pdserve-kv-decode-1-def", os.getpid())
    unowned = folder(tmp_path, "pdserve-kv-decode-2-ghi", None)
    other = folder(tmp_path, "someone-else", dead_pid())
    elsewhere = folder(tmp_path, "pdserve-kv-decode-3-jkl", dead_pid(), "pid:[1]")  # a pid of another namespace
    assert remove_orphaned_folders(str(tmp_path)) == [orphan]
    assert all(os.path.isdir(p) for p in (live, unowned, other, elsewhere)) and not os.path.exists(orphan)


def test_a_hosted_folder_names_its_owner_and_goes_on_close():
    rendezvous = Rendezvous("127.0.0.1", "decode-9")
    path = rendezvous.host().removeprefix("file:")
    with open(os.path.join(path, OWNER_FILE)) as f:
        assert f.read() == f"{os.getpid()} {NAMESPACE}"
    rendezvous.close()
    assert not os.path.exists(path)
