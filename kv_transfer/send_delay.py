"""Sends made slower on purpose, kept apart from the real transfer path: the modelled wire of a simulated engine,
and a pause injected for tests and drills. A `TorchDistConnector` given one waits `delay(blocks)` seconds after each
send's header, mid-transfer; a serving cluster sets neither.

    connector = TorchDistConnector("prefill-0", send_delay=simulated_wire(engine))
    connector = TorchDistConnector("prefill-0", send_delay=InjectedPause(4.0, count=1))
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from pdserve.engine.cost_model import Link

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine

SendDelay = Callable[[int], float]
"""Seconds a send of n blocks waits after its header."""


def simulated_wire(engine: Engine) -> SendDelay:
    """How long a sim engine's KV of n blocks would take on its modelled link (`engine.sim.kv_link`), in its dilated
    time; the placeholder KV itself is tiny."""
    per_block = engine.cost_model.kv_bytes_per_token() * engine.config.block_size
    link = Link[engine.config.sim.kv_link.upper()]
    scale = engine.config.sim.time_scale
    return lambda blocks: engine.cost_model.transfer_seconds(blocks * per_block, link) * scale


class InjectedPause:
    """Fault injection (`faults.kv_send_pause_s`): every send pauses `seconds`, or only the first `count` sends when
    count is not 0. Sends run on several threads."""

    def __init__(self, seconds: float, count: int = 0) -> None:
        self.seconds = seconds
        self._left = count if count else None
        self._lock = threading.Lock()

    def __call__(self, blocks: int) -> float:
        with self._lock:
            if self._left is None:
                return self.seconds
            if self._left <= 0:
                return 0.0
            self._left -= 1
            return self.seconds


def combined(*delays: SendDelay | None) -> SendDelay | None:
    """The sum of the delays given (None when none is)."""
    given = [d for d in delays if d is not None]
    if not given:
        return None
    return lambda blocks: sum(d(blocks) for d in given)
