"""The `controller:` section: when the ratio controller ticks, its hysteresis, the fleet's bounds for adds and
removes, and the policy that ticks (the built-in one's math is in `pdserve.controller`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from pdserve.config.bounds import at_least
from pdserve.engine.config import ConfigError


@dataclass(frozen=True)
class Controller:
    """The prefill:decode ratio controller (disaggregated mode; see controller/ for the math)."""

    enabled: bool = False
    """Tick the controller in the control plane; every decision goes to the log and Redis (`pdserve status` shows
    them)."""
    dry_run: bool = False
    """Decide and record, but move no worker."""
    interval_s: float = 5.0
    """Seconds between ticks."""
    cooldown_s: float = 15.0
    """No move within this long of the last one finishing."""
    window_s: float = 30.0
    """The traffic window: requests finished in the last this many seconds (from the Redis timings stream)."""
    max_moves: int = 2
    """Most workers one decision moves (they drain in parallel)."""
    confirm_ticks: int = 2
    """Ticks in a row a new target must be seen before a move (hysteresis)."""
    shift_ratio: float = 1.5
    """A change in the arriving prompts' length by this factor (and a split that fits it this much worse) is a shift
    in the mix: move at once, without confirmation or cooldown. .inf: never."""
    warmup_s: float = 60.0
    """After traffic begins, move only for a shift (or the first fit), and remove nothing, for this long (the first
    requests to finish are the short ones); adds go on."""
    min_gain: float = 0.05
    """Move only when the predicted bottleneck load falls by at least this much (a smaller gain is within the
    model's error, and a move costs a drain)."""
    target_load: float = 0.95
    """With max_workers: add workers when even the best split is loaded above this, as many as bring it there
    (judged at the arrival rate projected one worker start ahead)."""
    scale_down_load: float = 0.85
    """With min_workers: remove a worker when one fewer keeps both pools at or below this (below target_load)."""
    hand_on_after_s: float | None = None
    """A decode worker leaving its pool (moved, removed, drained) hands on the requests it still decodes this long
    after its drain began: each resumes on another decode worker, its prompt and tokens so far prefilled again,
    instead of holding the move up for minutes of long answers. None: wait for them to finish."""
    pin_prefill: int | None = None
    """With pin_decode: hold the split at this many prefill workers whatever the traffic (`pdserve ratio --pin`
    sets the same at run time)."""
    pin_decode: int | None = None
    min_workers: int | None = None
    """The controller may remove workers (drained first, the least loaded) down to this many. None: never."""
    max_workers: int | None = None
    """The controller may add workers (started through Ray in the pool that needs one) up to this many. None:
    never. On a Ray cluster with an autoscaler (KubeRay included) Ray brings up the node a new worker needs."""
    min_prefill: int = 1
    max_prefill: int | None = None
    """Per-pool bounds the controller keeps in moves, adds and removes (None: only the total bounds)."""
    min_decode: int = 1
    max_decode: int | None = None
    scale_down_cooldown_s: float = 120.0
    """No remove within this long of the last change: scaling down waits longer than scaling up (cooldown_s)."""
    add_timeout_s: float = 600.0
    """An added worker that Ray has not placed and started within this long is given up (killed) and the failure
    recorded; on a local Ray, an add the machine has no room for is refused at once."""
    policy: str = ""
    """The policy that ticks: "" (the built-in ratio controller) or "package.module:Class" (`controller.policy`)."""
    policy_config: dict[str, Any] = field(default_factory=dict)
    """The policy's own settings (the built-in one takes none: its settings are this section's)."""

    def __post_init__(self) -> None:
        at_least("interval_s", self.interval_s, 0.01)
        at_least("scale_down_cooldown_s", self.scale_down_cooldown_s, 0)
        at_least("add_timeout_s", self.add_timeout_s, 1)
        self._check_budget()
        self._check_policy()
        at_least("cooldown_s", self.cooldown_s, 0)
        at_least("window_s", self.window_s, 0.1)
        at_least("max_moves", self.max_moves, 1)
        at_least("confirm_ticks", self.confirm_ticks, 1)
        at_least("warmup_s", self.warmup_s, 0)
        at_least("min_gain", self.min_gain, 0)
        at_least("target_load", self.target_load, 0.01)
        at_least("scale_down_load", self.scale_down_load, 0)
        if self.scale_down_load >= self.target_load:
            raise ConfigError(f"scale_down_load: must be below target_load ({self.target_load}), got "
                              f"{self.scale_down_load!r} (or the fleet adds and removes in turn)")
        if not (isinstance(self.shift_ratio, (int, float)) and self.shift_ratio >= 1):
            raise ConfigError(f"shift_ratio: must be >= 1 (.inf: never), got {self.shift_ratio!r}")
        if self.hand_on_after_s is not None:
            at_least("hand_on_after_s", self.hand_on_after_s, 0)
        if (self.pin_prefill is None) != (self.pin_decode is None):
            raise ConfigError("pin_prefill: set pin_prefill and pin_decode together, or neither")
        for name, low in (("pin_prefill", self.min_prefill), ("pin_decode", self.min_decode)):
            if getattr(self, name) is not None:
                at_least(name, getattr(self, name), low)

    @property
    def pin(self) -> tuple[int, int] | None:
        return None if self.pin_prefill is None else (self.pin_prefill, self.pin_decode)

    def _check_budget(self) -> None:
        at_least("min_prefill", self.min_prefill, 1)
        at_least("min_decode", self.min_decode, 1)
        for name, low in (("max_prefill", self.min_prefill), ("max_decode", self.min_decode)):
            if getattr(self, name) is not None:
                at_least(name, getattr(self, name), low)
        smallest = self.min_prefill + self.min_decode
        for name in ("min_workers", "max_workers"):
            if getattr(self, name) is not None:
                at_least(name, getattr(self, name), smallest)
        if self.min_workers is not None and self.max_workers is not None and self.min_workers > self.max_workers:
            raise ConfigError(f"min_workers: must not exceed max_workers ({self.max_workers}), got {self.min_workers}")

    def _check_policy(self) -> None:
        """The policy's module must be importable (found, not imported: importing runs its code)."""
        if self.policy in ("", "ratio"):
            if self.policy_config:
                raise ConfigError("policy_config: the built-in ratio policy takes its settings from this section")
            return
        module, _, name = self.policy.partition(":")
        if not module or not name:
            raise ConfigError(f"policy: expected 'package.module:Class' (or 'ratio'), got {self.policy!r}")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise ConfigError(f"policy: no module {module!r} is importable here")
