"""Whether speculative decoding pays on this engine, measured as it runs: speculation that costs more time per token
than plain decoding turns itself off (for the methods that pay for extra rows every step: a draft model, lookahead;
prompt lookup checks rows only where its n-gram matched and pauses after misses, `engine.prompt_lookup`).

Per decode batch size (1 .. max_batch), the governor keeps the seconds per emitted token of steps that decode only,
with speculation and without, as moving averages. While speculation is on, one decode step in `PROBE_EVERY` runs
plainly (a probe; one in `LEARN_EVERY` until each side has `MIN_SAMPLES` steps), so both figures stay current; once
measured, speculation goes off for batch sizes where it costs more per token than plain decoding (by `MARGIN`), and
then one step in `PROBE_EVERY` speculates, so it comes back when the text (or the load) makes it pay again. A verify
step's cost depends on the hardware (a few rows cost a GPU about one, a small CPU several: BENCHMARKS.md) and
acceptance on the text, so neither can be set once.
"""

from __future__ import annotations

from dataclasses import dataclass

PROBE_EVERY = 16
LEARN_EVERY = 4
MIN_SAMPLES = 8
SMOOTHING = 0.1
"""Weight of a new step in the moving averages."""
MARGIN = 0.1
"""Speculation goes off only when it costs this much more per token than plain decoding: a noisy step must not turn
off a method that pays, which one probe in `PROBE_EVERY` would take long to turn on again."""


@dataclass
class _Cost:
    seconds_per_token: float = 0.0
    samples: int = 0

    def add(self, value: float) -> None:
        self.seconds_per_token = value if not self.samples else (
            (1 - SMOOTHING) * self.seconds_per_token + SMOOTHING * value)
        self.samples += 1


class Governor:
    def __init__(self, max_batch: int, adaptive: bool = True) -> None:
        """`adaptive` False: speculate at every batch size up to `max_batch`, measuring nothing."""
        self.max_batch = max_batch
        self.adaptive = adaptive
        self._costs = {(batch, speculated): _Cost() for batch in range(1, max_batch + 1)
                       for speculated in (False, True)}
        self._steps = dict.fromkeys(range(1, max_batch + 1), 0)

    def speculate(self, batch: int) -> bool:
        """Whether a step decoding `batch` requests speculates (called once per such step)."""
        if not 1 <= batch <= self.max_batch:
            return False
        if not self.adaptive:
            return True
        self._steps[batch] += 1
        probe = self._steps[batch] % (PROBE_EVERY if self._measured(batch) else LEARN_EVERY) == 0
        return self.pays(batch) != probe

    def pays(self, batch: int) -> bool:
        """Speculation costs no more per token than plain decoding at this batch size (or is not measured yet)."""
        if not self._measured(batch):
            return True
        return self._costs[batch, True].seconds_per_token <= (1 + MARGIN) * self._costs[batch, False].seconds_per_token

    def _measured(self, batch: int) -> bool:
        return min(self._costs[batch, False].samples, self._costs[batch, True].samples) >= MIN_SAMPLES

    def observe(self, batch: int, speculated: bool, seconds: float, tokens: int) -> None:
        """A step that only decoded `batch` requests took `seconds` and emitted `tokens`."""
        if self.adaptive and 1 <= batch <= self.max_batch and tokens > 0:
            self._costs[batch, speculated].add(seconds / tokens)
