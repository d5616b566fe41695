"""A performance model slowed down by a constant: a live sim cluster's cost model when it runs on dilated time."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.controller.perf_model import PerfModel


@dataclass(frozen=True)
class ScaledModel:
    model: PerfModel
    scale: float
    """Real seconds per modelled second (`engine.sim.time_scale`)."""

    def prefill_seconds(self, prompt_tokens: int) -> float:
        return self.model.prefill_seconds(prompt_tokens) * self.scale

    def decode_step_seconds(self, batch: int, context_len: int) -> float:
        return self.model.decode_step_seconds(batch, context_len) * self.scale
