"""Where the Batch API keeps its files and batches: file contents on disk (`router.files_dir`, shared by the routers
of a machine), every file's and batch's record in Redis, so a router that restarts, or another router, finds them.

Redis keys (under the cluster's prefix):
    file:<id>            a file's record (JSON: OpenAI's file object and its path)
    files                file ids by creation time (a sorted set)
    batch:<id>           a batch's record (JSON: OpenAI's batch object); written by the router holding its lease
    batches              batch ids by creation time (a sorted set)
    batches:open         ids of batches not yet in a final state (the runners' work list)
    batch:<id>:owner     the lease: the router running the batch, expiring unless renewed
    batch:<id>:cancel    set by POST /v1/batches/<id>/cancel; the runner that holds the batch acts on it
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass

import redis

from pdserve.config import state_dir

FINAL = ("completed", "failed", "expired", "cancelled")
"""Batch states that never change again."""
_RENEW_LEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end
"""


def default_files_dir() -> str:
    """`files` beside the cluster's state file: in $PDSERVE_STATE_DIR or ~/.cache/pdserve/run."""
    return os.path.join(state_dir(), "files")


class NotFound(LookupError):
    """No file or batch has that id; the message says which."""


@dataclass(frozen=True)
class StoredFile:
    record: dict
    """OpenAI's file object: id, object, bytes, created_at, filename, purpose."""
    path: str


class BatchStore:
    def __init__(self, client: redis.Redis, prefix: str, files_dir: str) -> None:
        self.redis = client
        self.prefix = prefix
        self.files_dir = files_dir
        self._renew = client.register_script(_RENEW_LEASE)

    # ---- files -------------------------------------------------------------------------------------------------
    def put_file(self, data: bytes, filename: str, purpose: str) -> dict:
        file_id = f"file-{uuid.uuid4().hex}"
        os.makedirs(self.files_dir, exist_ok=True)
        path = os.path.join(self.files_dir, file_id)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return self.register_file(file_id, path, filename, purpose)

    def register_file(self, file_id: str, path: str, filename: str, purpose: str) -> dict:
        """Record a file already on disk (a batch's output is written first, then registered)."""
        created = int(time.time())
        record = {"id": file_id, "object": "file", "bytes": os.path.getsize(path), "created_at": created,
                  "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
        self.redis.set(self._key("file", file_id), json.dumps({"record": record, "path": path}))
        self.redis.zadd(self._key("files"), {file_id: created})
        return record

    def file(self, file_id: str) -> StoredFile:
        raw = self.redis.get(self._key("file", file_id)) if ":" not in file_id else None
        if raw is None:
            raise NotFound(f"file_id: no file {file_id!r}")
        found = json.loads(raw)
        return StoredFile(found["record"], found["path"])

    def files(self, limit: int = 100) -> list[dict]:
        ids = self.redis.zrevrange(self._key("files"), 0, limit - 1)
        return [self.file(i.decode()).record for i in ids if self.redis.exists(self._key("file", i.decode()))]

    def delete_file(self, file_id: str) -> None:
        stored = self.file(file_id)
        self.redis.delete(self._key("file", file_id))
        self.redis.zrem(self._key("files"), file_id)
        if os.path.exists(stored.path):
            os.remove(stored.path)

    def output_path(self, batch_id: str, kind: str) -> str:
        """Where a batch's `output` or `error` lines are written while it runs."""
        os.makedirs(self.files_dir, exist_ok=True)
        return os.path.join(self.files_dir, f"{batch_id}-{kind}.jsonl")

    # ---- batches -----------------------------------------------------------------------------------------------
    def create_batch(self, record: dict) -> dict:
        self.save_batch(record)
        self.redis.zadd(self._key("batches"), {record["id"]: record["created_at"]})
        if record["status"] not in FINAL:
            self.redis.sadd(self._key("batches:open"), record["id"])
        return record

    def save_batch(self, record: dict) -> None:
        self.redis.set(self._key("batch", record["id"]), json.dumps(record))
        if record["status"] in FINAL:
            self.redis.srem(self._key("batches:open"), record["id"])

    def batch(self, batch_id: str) -> dict:
        raw = self.redis.get(self._key("batch", batch_id)) if ":" not in batch_id else None  # (":" names its parts)
        if raw is None:
            raise NotFound(f"batch_id: no batch {batch_id!r}")
        record = json.loads(raw)
        if record["status"] not in FINAL and self.cancel_requested(batch_id):
            record["status"] = "cancelling"
            record["cancelling_at"] = record.get("cancelling_at") or self._cancelled_at(batch_id)
        return record

    def batches(self, limit: int = 20) -> list[dict]:
        ids = self.redis.zrevrange(self._key("batches"), 0, limit - 1)
        return [self.batch(i.decode()) for i in ids]

    def open_batches(self) -> list[str]:
        return sorted(i.decode() for i in self.redis.smembers(self._key("batches:open")))

    def request_cancel(self, batch_id: str) -> None:
        self.redis.set(self._key("batch", f"{batch_id}:cancel"), int(time.time()))

    def cancel_requested(self, batch_id: str) -> bool:
        return bool(self.redis.exists(self._key("batch", f"{batch_id}:cancel")))

    def _cancelled_at(self, batch_id: str) -> int | None:
        raw = self.redis.get(self._key("batch", f"{batch_id}:cancel"))
        return int(raw) if raw is not None else None

    # ---- leases ------------------------------------------------------------------------------------------------
    def claim(self, batch_id: str, owner: str, ttl_s: float) -> bool:
        """Take the batch's lease if nobody holds it."""
        return bool(self.redis.set(self._key("batch", f"{batch_id}:owner"), owner, nx=True, px=int(ttl_s * 1000)))

    def renew(self, batch_id: str, owner: str, ttl_s: float) -> bool:
        """Extend our lease; False if it is no longer ours (it expired and another router took it)."""
        return bool(self._renew(keys=[self._key("batch", f"{batch_id}:owner")], args=[owner, int(ttl_s * 1000)]))

    def release(self, batch_id: str, owner: str) -> None:
        key = self._key("batch", f"{batch_id}:owner")
        if self.redis.get(key) == owner.encode():
            self.redis.delete(key)

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}:{kind}:{name}" if name else f"{self.prefix}:{kind}"
