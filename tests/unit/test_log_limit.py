"""RepeatFilter: the same message template passes once per interval, and the next one after says how many were
held back; other templates, levels and loggers pass on their own."""

import logging

from pdserve.router.log_limit import RepeatFilter


def record(msg: str, name: str = "asyncio", level: int = logging.ERROR, args=()) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_repeated_message_passes_once_per_interval_and_counts_the_rest():
    now = [0.0]
    limit = RepeatFilter(10.0, clock=lambda: now[0])
    passed = [limit.filter(record("accept failed on %s", args=(i,))) for i in range(1000)]
    assert passed.count(True) == 1
    now[0] = 10.0
    later = record("accept failed on %s", args=(7,))
    assert limit.filter(later) and "999 more like this" in later.getMessage()
    assert later.getMessage().startswith("accept failed on 7")


def test_other_templates_levels_and_loggers_pass_on_their_own():
    limit = RepeatFilter(10.0, clock=lambda: 0.0)
    assert limit.filter(record("a"))
    assert limit.filter(record("b"))
    assert limit.filter(record("a", level=logging.WARNING))
    assert limit.filter(record("a", name="grpc"))
    assert not limit.filter(record("a"))
