"""An ASGI middleware that refuses HTTP request bodies over a size before they are read whole (413).

A body that announces its length (Content-Length) over the limit is refused without reading any of it; one sent in
chunks is read up to the limit and refused as soon as it passes it. A body within the limit is handed to the app
as it came (then the connection's own messages, so a client's disconnect still reaches the handler), which keeps a
client from taking the router's memory and event loop with a huge prompt.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from pdserve.router import openai_protocol as oa

TOO_LARGE = 413


class BodyLimit:
    def __init__(self, app, max_bytes: int, file_max_bytes: int | None = None) -> None:
        """`file_max_bytes`: the limit for uploads to /v1/files (the Batch API's input files); default max_bytes."""
        self.app = app
        self.max_bytes = max_bytes
        self.file_max_bytes = file_max_bytes or max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        upload = scope["path"] == "/v1/files"
        limit, setting = (self.file_max_bytes, "router.max_file_bytes") if upload else (self.max_bytes,
                                                                                      "router.max_body_bytes")
        announced = dict(scope["headers"]).get(b"content-length")
        if announced is not None and announced.isdigit() and int(announced) > limit:
            await self._refuse(scope, receive, send, limit, setting)
            return
        body, whole = await self._read(receive, limit)
        if not whole:
            await self._refuse(scope, receive, send, limit, setting)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive, limit: int) -> tuple[bytes, bool]:
        """The body, and whether it fits (False as soon as it passes the limit, or the client left)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"", False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), True

    async def _refuse(self, scope, receive, send, limit: int, setting: str) -> None:
        error = oa.OpenAIError(TOO_LARGE, f"body: larger than {limit} bytes ({setting})", param="body",
                               code="request_too_large")
        await JSONResponse(error.body(), status_code=TOO_LARGE, headers={"connection": "close"})(scope, receive, send)


def _replay(body: bytes, receive):
    """A `receive` that gives the read body once, then the connection's own messages."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
