"""A logging filter that lets a repeated message through at most once per interval, so a fault that repeats
thousands of times a second (asyncio failing to accept connections at the file limit, a client flood) cannot fill
the disk with the same traceback: issue 18's probe grew a router's log by 188 MB in 50 s.

    limit_repeats(logging.getLogger("asyncio"))

Records are told apart by logger, level and message template (not their arguments); the next one let through after
a quiet spell says how many were held back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

INTERVAL_S = 10.0


class RepeatFilter(logging.Filter):
    def __init__(self, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[tuple[str, int, str], float] = {}
        self._held: dict[tuple[str, int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} [{held} more like this in the last {self.interval_s:.0f} s not logged]"
        return True


def limit_repeats(logger: logging.Logger, interval_s: float = INTERVAL_S) -> RepeatFilter:
    """Install a RepeatFilter on `logger` (records of its child loggers pass through their own filters)."""
    repeat_filter = RepeatFilter(interval_s)
    logger.addFilter(repeat_filter)
    return repeat_filter
