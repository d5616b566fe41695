"""Runs the Batch API's batches, at whichever router holds each one's lease.

Life of a batch: POST /v1/batches records it (`validating`, or `failed` when its input file has bad lines) -> every
router's runner looks at the open batches each second, and one takes the batch's lease (`BatchStore.claim`) ->
`in_progress`: its lines go through the router like HTTP requests (`OpenAIServer.batch_answer`), at low priority
(`engine.request.BATCH_PRIORITY` unless a line's body sets `priority`), so the router's `PriorityGate` and the
engines give online traffic the room first; each answer is appended to the output or error file as it comes ->
`finalizing` -> `completed` with the output and error files registered, or `cancelled` (after a cancel: the answers
so far are kept) or `expired` (past its completion window).

A router that dies mid-batch stops renewing the lease; when it expires (`LEASE_S`) the next runner, on the restarted
router or another, takes the batch and goes on with the lines the files do not yet answer. No line is lost and none
is answered twice. A line refused for want of room (429, 503) is retried before it is written as failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import redis

from pdserve.router.batch_lines import BatchLine, ResultFiles, read_input
from pdserve.router.batch_store import FINAL, BatchStore, NotFound

log = logging.getLogger(__name__)

LEASE_S = 10.0
"""A batch's lease lasts this long unless renewed: how long a dead router's batch waits before another takes it."""
RENEW_S = 2.0
POLL_S = 1.0
SAVE_S = 1.0
"""Counts in the batch's record are brought up to date at most this often."""
RETRIES = 5
"""A line refused for want of room (429, 503) is tried again this many times, 1, 2, 4, ... s apart."""
TRANSIENT = (429, 503)

Answer = Callable[[str, dict, str], Awaitable[tuple[int, dict]]]
"""(endpoint, body, request id) -> (HTTP status, response or error body)."""


class BatchRunner:
    def __init__(self, store: BatchStore, answer: Answer, owner: str, concurrency: int) -> None:
        """`owner`: this router's id (the lease's holder); `concurrency`: lines in flight at once, all batches
        together (keep it above `router.low_priority_limit`, so the gate always has one waiting)."""
        self.store = store
        self.answer = answer
        self.owner = owner
        self.slots = asyncio.Semaphore(concurrency)
        self.running: dict[str, asyncio.Task] = {}

    async def run(self) -> None:
        """Take and run open batches until cancelled."""
        try:
            while True:
                await self._take_open()
                await asyncio.sleep(POLL_S)
        finally:
            for task in self.running.values():
                task.cancel()
            await asyncio.gather(*self.running.values(), return_exceptions=True)

    async def _take_open(self) -> None:
        try:
            open_ids = await asyncio.to_thread(self.store.open_batches)
            for batch_id in open_ids:
                if batch_id not in self.running and await asyncio.to_thread(self.store.claim, batch_id, self.owner,
                                                                            LEASE_S):
                    task = asyncio.create_task(self._run_batch(batch_id), name=f"batch-{batch_id}")
                    self.running[batch_id] = task
                    task.add_done_callback(lambda _, b=batch_id: self.running.pop(b, None))
        except (OSError, redis.RedisError) as e:  # Redis away: try again next time
            log.warning("batch runner: %s", e)

    async def _run_batch(self, batch_id: str) -> None:
        keeper = asyncio.create_task(self._keep_lease(batch_id, asyncio.current_task()))
        try:
            await self._work(batch_id)
        except asyncio.CancelledError:
            log.warning("batch %s: stopped here (lease lost or router stopping); another runner goes on", batch_id)
            raise
        finally:
            keeper.cancel()
            await asyncio.to_thread(self.store.release, batch_id, self.owner)

    async def _keep_lease(self, batch_id: str, work: asyncio.Task) -> None:
        while True:
            await asyncio.sleep(RENEW_S)
            try:
                held = await asyncio.to_thread(self.store.renew, batch_id, self.owner, LEASE_S)
            except (OSError, redis.RedisError) as e:
                log.warning("batch %s: lease not renewed: %s", batch_id, e)
                continue
            if not held:
                work.cancel()
                return

    async def _work(self, batch_id: str) -> None:
        record = await asyncio.to_thread(self.store.batch, batch_id)
        if record["status"] in FINAL:
            return
        try:
            stored = await asyncio.to_thread(self.store.file, record["input_file_id"])
            lines, errors = await asyncio.to_thread(read_input, stored.path, record["endpoint"])
        except (NotFound, OSError) as e:  # its input file was deleted (or is unreadable) before it could run
            await self._save(record, status="failed", failed_at=_now(), errors={"object": "list", "data": [
                {"code": "invalid_request", "message": f"input_file_id: {e}", "param": "input_file_id",
                 "line": None}]})
            return
        if errors:  # checked at creation too: the file changed under it
            await self._save(record, status="failed", failed_at=_now(),
                             errors={"object": "list", "data": [e.record() for e in errors]})
            return
        files = ResultFiles(self.store.output_path(batch_id, "output"), self.store.output_path(batch_id, "error"))
        try:
            if record["status"] != "in_progress":
                await self._save(record, status="in_progress", in_progress_at=_now())
            outcome = await self._lines(record, [line for line in lines if line.custom_id not in files.done], files,
                                        len(lines))
        finally:
            files.close()
        await self._finish(record, files, outcome, len(lines))

    async def _lines(self, record: dict, todo: list[BatchLine], files: ResultFiles, total: int) -> str:
        """Run the lines (at most `concurrency` at once); the batch's end state: completed, cancelled or expired."""
        batch_id = record["id"]
        pending: set[asyncio.Task] = set()
        outcome = "completed"
        last_save = 0.0
        try:
            for line in todo:
                await self.slots.acquire()
                if await asyncio.to_thread(self.store.cancel_requested, batch_id):
                    self.slots.release()
                    outcome = "cancelled"
                    break
                if time.time() > record["expires_at"]:
                    self.slots.release()
                    outcome = "expired"
                    break
                pending.add(asyncio.create_task(self._line(record, line, files)))
                if time.monotonic() - last_save > SAVE_S:
                    last_save = time.monotonic()
                    await self._save(record, request_counts=_counts(files, total))
            await asyncio.gather(*pending)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return outcome

    async def _line(self, record: dict, line: BatchLine, files: ResultFiles) -> None:
        request_id = f"{record['id']}-{line.index}"
        try:
            for attempt in range(RETRIES + 1):
                try:
                    status, body = await self.answer(record["endpoint"], line.body, request_id)
                except Exception as e:  # noqa: BLE001 - a bug answering one line is that line's error, not the batch's
                    log.exception("batch %s, line %s: no answer", record["id"], line.custom_id)
                    status, body = 500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}}
                if status not in TRANSIENT or attempt == RETRIES:
                    break
                await asyncio.sleep(2 ** attempt)
            files.answered(line.custom_id, request_id, status, body)
        finally:
            self.slots.release()

    async def _finish(self, record: dict, files: ResultFiles, outcome: str, total: int) -> None:
        batch_id = record["id"]
        await self._save(record, status="finalizing", finalizing_at=_now(), request_counts=_counts(files, total))
        ids = {}
        for kind in ("output", "error"):
            path = self.store.output_path(batch_id, kind)
            count = files.completed if kind == "output" else files.failed
            if count:
                ids[f"{kind}_file_id"] = (await asyncio.to_thread(
                    self.store.register_file, f"file-{batch_id}-{kind}", path, f"{batch_id}_{kind}.jsonl",
                    "batch_output"))["id"]
        await self._save(record, status=outcome, **{f"{outcome}_at": _now()}, **ids)
        log.info("batch %s %s: %d completed, %d failed of %d", batch_id, outcome, files.completed, files.failed, total)

    async def _save(self, record: dict, **changes) -> None:
        record.update(changes)
        await asyncio.to_thread(self.store.save_batch, record)


def _counts(files: ResultFiles, total: int) -> dict:
    return {"total": total, "completed": files.completed, "failed": files.failed}


def _now() -> int:
    return int(time.time())
