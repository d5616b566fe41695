"""What a simulated cluster run is given (`SimSetup`) and what it gives back (`SimResult`, with `PoolSample`s of the
pool sizes over time): shared by the exact simulator (`bench.simulator`) and the fast one (`bench.fast_simulator`),
so that `pdserve plan` runs either on the same setup and reads either's results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pdserve.bench.metrics import SLO, RequestRecord
from pdserve.controller.config import ControllerConfig
from pdserve.controller.decision import Decision
from pdserve.engine.config import EngineConfig
from pdserve.engine.cost_model import Link


@dataclass(frozen=True)
class SimSetup:
    """One simulated cluster: its engines, its starting split, its SLOs and (optionally) its controller."""

    engine: EngineConfig
    prefill: int
    decode: int
    slo: SLO
    controller: ControllerConfig | None = None
    """None: the split stays as it started (a static split). With a policy, its context (budget, SLOs, interval)."""
    policy: str = ""
    """The policy that ticks ("" or "ratio": the built-in ratio controller; "package.module:Class": a plug-in, see
    `controller.policy`); only with `controller`."""
    policy_config: Mapping[str, Any] = field(default_factory=dict)
    """The policy's own settings."""
    worker_start_s: float = 60.0
    """An added worker's start: Ray places it (on a node an autoscaler may bring up), the engine loads its weights,
    the KV pairs form."""
    link: Link = Link.NETWORK
    layerwise: bool = False
    """KV streamed layer by layer during the prefill's last step (`CostModel.streamed_transfer_seconds`)."""
    role_switch_s: float = 5.0
    """A drained worker's restart in its new role (engine and KV pairs rebuilt; weights stay on the GPU)."""
    window_s: float = 30.0
    """The controller's traffic window: requests finished in the last this many seconds."""
    hand_on_after_s: float | None = None
    """A leaving decode worker hands on what it still runs this long into its drain; None: waits for it to finish."""
    horizon_s: float = 600.0
    """After the last arrival, how long unfinished requests may take before they count as lost."""
    routing: str = "kv_aware"
    """As router.routing: "load", or "kv_aware" (with engine.prefix_caching), which here reads the engines' own
    caches (a router's index without the event lag)."""
    cache_weight: float = 1.0


@dataclass(frozen=True)
class PoolSample:
    t: float
    prefill: int
    decode: int
    """Workers serving in each pool."""
    held: int = 0
    """Workers holding a machine: serving, starting, draining or switching roles (what the fleet pays for)."""


@dataclass(frozen=True)
class SimResult:
    records: tuple[RequestRecord, ...]
    decisions: tuple[Decision, ...]
    pool_samples: tuple[PoolSample, ...]
    duration_s: float
    """Virtual seconds from the first arrival to the last finish."""
    prompt_tokens: int = 0
    """Prompt tokens of every prefill (a request resumed elsewhere counts again)."""
    cached_tokens: int = 0
    """Of those, tokens the prefill workers took from their prefix caches."""

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def worker_seconds(self) -> float:
        """Machine time held by workers (serving, starting, draining) from the first sample to the last finish."""
        samples = self.pool_samples
        if not samples:
            return 0.0
        end = samples[0].t + self.duration_s
        times = [s.t for s in samples[1:]] + [max(end, samples[-1].t)]
        return sum(s.held * (t - s.t) for s, t in zip(samples, times))
