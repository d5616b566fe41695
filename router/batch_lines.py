"""A batch's input and output files, line by line (OpenAI's Batch API formats).

Input: one JSON object per line, `{"custom_id": str, "method": "POST", "url": <the batch's endpoint>, "body": {...}}`,
custom ids unique. `read_input` checks every line before the batch starts; each problem names its line.

Output: `ResultFiles` appends one line per finished request, to the output file (`response.status_code` 200) or the
error file, flushed as it is written. Reopened after a restart, it first cuts a line left half-written and then
knows which custom ids are done: those are not run again, so every line is answered once.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_LINES = 50_000
"""As OpenAI's limit per batch."""


@dataclass(frozen=True)
class BatchLine:
    index: int
    custom_id: str
    body: dict


@dataclass(frozen=True)
class LineError:
    line: int
    """1-based, as an editor numbers it."""
    message: str
    param: str | None = None

    def record(self) -> dict:
        return {"code": "invalid_request", "message": self.message, "param": self.param, "line": self.line}


def read_input(path: str, endpoint: str) -> tuple[list[BatchLine], list[LineError]]:
    """The file's lines, or the problems with it (then no line runs)."""
    lines, errors, seen = [], [], set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if len(lines) + len(errors) >= MAX_LINES:
                errors.append(LineError(number, f"more than {MAX_LINES} requests in one batch"))
                break
            line, error = _parse(number, raw, endpoint, seen)
            if error is not None:
                errors.append(error)
            else:
                lines.append(line)
    if not lines and not errors:
        errors.append(LineError(0, "the input file has no requests"))
    return lines, errors


def _parse(number: int, raw: bytes, endpoint: str, seen: set[str]) -> tuple[BatchLine | None, LineError | None]:
    try:
        item = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, LineError(number, f"not a JSON object: {e}")
    if not isinstance(item, dict):
        return None, LineError(number, "not a JSON object")
    custom_id, body = item.get("custom_id"), item.get("body")
    for field, bad in (("custom_id", not isinstance(custom_id, str) or not custom_id),
                       ("method", item.get("method") != "POST"),
                       ("url", item.get("url") != endpoint),
                       ("body", not isinstance(body, dict))):
        if bad:
            want = {"custom_id": "a non-empty string", "method": '"POST"', "url": f"{endpoint!r} (the batch's "
                    "endpoint)", "body": "a JSON object"}[field]
            return None, LineError(number, f"{field}: must be {want}", field)
    if custom_id in seen:
        return None, LineError(number, f"custom_id: {custom_id!r} is used twice", "custom_id")
    seen.add(custom_id)
    return BatchLine(number - 1, custom_id, body), None


class ResultFiles:
    """A batch's output and error files, appended to as its requests finish."""

    def __init__(self, output_path: str, error_path: str) -> None:
        self.paths = {"output": output_path, "error": error_path}
        self.done: set[str] = set()
        self.completed = 0
        self.failed = 0
        for kind, path in self.paths.items():
            for item in _whole_lines(path):
                self.done.add(item["custom_id"])
                if kind == "output":
                    self.completed += 1
                else:
                    self.failed += 1
        self._files = {kind: open(path, "a", encoding="utf-8") for kind, path in self.paths.items()}

    def answered(self, custom_id: str, request_id: str, status: int, body: dict) -> None:
        """One request's answer: its body (status 200) or OpenAI's error body."""
        kind = "output" if status == 200 else "error"
        line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
                "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}
        f = self._files[kind]
        f.write(json.dumps(line) + "\n")
        f.flush()
        self.done.add(custom_id)
        if kind == "output":
            self.completed += 1
        else:
            self.failed += 1

    def close(self) -> None:
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()


def _whole_lines(path: str) -> list[dict]:
    """The file's complete lines; a last line cut short (the router died writing it) is removed from the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    return [json.loads(line) for line in whole.splitlines() if line.strip()]
