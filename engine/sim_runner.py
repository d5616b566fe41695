"""The simulated model runner: the engine's steps take the time a roofline cost model says, and produce placeholders.

A `sim` engine (`engine.backend: sim`) keeps everything that decides behaviour real (the scheduler, the block manager,
chunked prefill, preemption, the workers and the router around it) and swaps only the model: each step's duration
comes from `CostModel.step_cost` for the named hardware and model shape, and each sampled token is a placeholder.

Live (`realtime=True`, inside a worker) `run` sleeps until the step's modelled end, measured from when it began, so a
cluster of simulated GPUs runs in real time on a few CPU cores. Offline (`realtime=False`, the discrete-event planner)
it returns at once and the caller reads `last_cost` to advance its own clock.

Placeholders: token `PLACEHOLDER_TOKEN` (never an EOS id of the named shapes), so a request runs to its max_tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pdserve.engine.cost_model import CostModel, StepCost
from pdserve.engine.layer_progress import LayerProgress
from pdserve.engine.logprobs import Sampled, StepResult
from pdserve.engine.scheduler import ScheduledChunk

PLACEHOLDER_TOKEN = 1000


class SimRunner:
    def __init__(self, cost_model: CostModel, realtime: bool = True, time_scale: float = 1.0) -> None:
        self.cost_model = cost_model
        self.realtime = realtime
        self.time_scale = time_scale
        """Real seconds per modelled second when live."""
        self.last_cost: StepCost | None = None
        """The last step's modelled cost (FLOPs, bytes, seconds)."""
        self.busy_s = 0.0
        """Modelled seconds of all steps so far."""

    def run(self, chunks: tuple[ScheduledChunk, ...], streams: Sequence[LayerProgress] = ()) -> StepResult:
        """'Compute' the chunks: wait the modelled time (live) and sample a placeholder for each chunk that samples.
        `streams` learn that every layer is done at the end (the placeholder KV has no layers to stream)."""
        started = time.monotonic()
        new = context = pairs = sampled = 0
        for c in chunks:  # the sums of CostModel.step_cost, without building a ChunkShape per chunk
            n = len(c.token_ids)
            k = c.start_pos + n
            new += n
            context += k
            pairs += n * k - (n * (n - 1) >> 1)
            sampled += c.sample
        cost = self.cost_model.sums_cost(new, context, pairs, sampled)
        self.last_cost = cost
        self.busy_s += cost.seconds
        if self.realtime:
            left = started + cost.seconds * self.time_scale - time.monotonic()
            if left > 0:
                time.sleep(left)
        for progress in streams:
            progress.layer_done(progress.layers - 1)
        return StepResult({c.request_id: Sampled(PLACEHOLDER_TOKEN) for c in chunks if c.sample}, {})
