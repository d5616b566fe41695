"""OpenAI's Files and Batch API on the router's HTTP port, as the official `openai` client calls it.

    POST   /v1/files                    upload a JSONL file of requests (multipart: `file`, `purpose`)
    GET    /v1/files                    the files, newest first
    GET    /v1/files/{id}               one file's record
    GET    /v1/files/{id}/content       its bytes (a batch's output and error files too)
    DELETE /v1/files/{id}
    POST   /v1/batches                  {input_file_id, endpoint, completion_window: "24h", metadata}
    GET    /v1/batches                  the batches, newest first
    GET    /v1/batches/{id}             status and request counts
    POST   /v1/batches/{id}/cancel      stop starting its requests; those running finish, the answers are kept

Records live in Redis and file contents on disk (`batch_store`); the runners of the routers run the batches
(`batch_runner`). Errors come in OpenAI's shape: 400 naming the field, 404 for an unknown id.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict

from pdserve.router import openai_protocol as oa
from pdserve.router.batch_lines import ENDPOINTS, read_input
from pdserve.router.batch_store import FINAL, BatchStore, NotFound

COMPLETION_WINDOW = "24h"
WINDOW_S = 24 * 3600


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str = COMPLETION_WINDOW
    metadata: dict[str, str] | None = None


class BatchAPI:
    def __init__(self, store: BatchStore) -> None:
        self.store = store

    def add_routes(self, app: FastAPI) -> None:
        app.post("/v1/files")(self.upload)
        app.get("/v1/files")(self.list_files)
        app.get("/v1/files/{file_id}")(self.get_file)
        app.get("/v1/files/{file_id}/content")(self.file_content)
        app.delete("/v1/files/{file_id}")(self.delete_file)
        app.post("/v1/batches")(self.create_batch)
        app.get("/v1/batches")(self.list_batches)
        app.get("/v1/batches/{batch_id}")(self.get_batch)
        app.post("/v1/batches/{batch_id}/cancel")(self.cancel_batch)

    # ---- files -------------------------------------------------------------------------------------------------
    async def upload(self, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> dict:
        if purpose != "batch":
            raise oa.OpenAIError(400, f"purpose: {purpose!r} is not supported (batch)", param="purpose")
        data = await file.read()
        return await asyncio.to_thread(self.store.put_file, data, file.filename or "upload.jsonl", purpose)

    async def list_files(self) -> dict:
        return {"object": "list", "data": await asyncio.to_thread(self.store.files), "has_more": False}

    async def get_file(self, file_id: str) -> dict:
        return (await self._file(file_id)).record

    async def file_content(self, file_id: str) -> FileResponse:
        stored = await self._file(file_id)
        return FileResponse(stored.path, media_type="application/octet-stream")

    async def delete_file(self, file_id: str) -> dict:
        await self._file(file_id)
        await asyncio.to_thread(self.store.delete_file, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- batches -----------------------------------------------------------------------------------------------
    async def create_batch(self, body: BatchCreate) -> dict:
        if body.endpoint not in ENDPOINTS:
            raise oa.OpenAIError(400, f"endpoint: {body.endpoint!r} is not supported (one of {list(ENDPOINTS)})",
                                 param="endpoint")
        if body.completion_window != COMPLETION_WINDOW:
            raise oa.OpenAIError(400, f"completion_window: only {COMPLETION_WINDOW!r}", param="completion_window")
        stored = await self._file(body.input_file_id, param="input_file_id")
        if stored.record["purpose"] != "batch":
            raise oa.OpenAIError(400, "input_file_id: the file's purpose is not batch", param="input_file_id")
        lines, errors = await asyncio.to_thread(read_input, stored.path, body.endpoint)
        record = new_batch(body, len(lines))
        if errors:
            record.update(status="failed", failed_at=record["created_at"],
                          errors={"object": "list", "data": [e.record() for e in errors[:100]]})
        return await asyncio.to_thread(self.store.create_batch, record)

    async def list_batches(self, limit: int = 20) -> dict:
        found = await asyncio.to_thread(self.store.batches, max(1, min(limit, 100)))
        return {"object": "list", "data": found, "first_id": found[0]["id"] if found else None,
                "last_id": found[-1]["id"] if found else None, "has_more": False}

    async def get_batch(self, batch_id: str) -> dict:
        return await self._batch(batch_id)

    async def cancel_batch(self, batch_id: str) -> dict:
        record = await self._batch(batch_id)
        if record["status"] in FINAL:
            raise oa.OpenAIError(400, f"batch_id: the batch is {record['status']} and cannot be cancelled",
                                 param="batch_id")
        await asyncio.to_thread(self.store.request_cancel, batch_id)
        return await self._batch(batch_id)

    async def _file(self, file_id: str, param: str = "file_id"):
        try:
            return await asyncio.to_thread(self.store.file, file_id)
        except NotFound as e:
            raise oa.OpenAIError(404, f"{param}: no file {file_id!r}", kind="not_found_error", param=param) from e

    async def _batch(self, batch_id: str) -> dict:
        try:
            return await asyncio.to_thread(self.store.batch, batch_id)
        except NotFound as e:
            raise oa.OpenAIError(404, f"batch_id: no batch {batch_id!r}", kind="not_found_error",
                                 param="batch_id") from e


def new_batch(body: BatchCreate, total: int) -> dict[str, Any]:
    created = int(time.time())
    record: dict[str, Any] = {
        "id": f"batch_{uuid.uuid4().hex}", "object": "batch", "endpoint": body.endpoint, "errors": None,
        "input_file_id": body.input_file_id, "completion_window": body.completion_window, "status": "validating",
        "output_file_id": None, "error_file_id": None, "created_at": created, "expires_at": created + WINDOW_S,
        "request_counts": {"total": total, "completed": 0, "failed": 0}, "metadata": body.metadata}
    for stage in ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"):
        record[f"{stage}_at"] = None
    return record
