"""The one range check every config section shares: a finite number at or above a bound, else a `ConfigError`
naming the field."""

from __future__ import annotations

import math

from pdserve.engine.config import ConfigError


def at_least(name: str, value: float, low: float) -> None:
    if not (math.isfinite(value) and value >= low):
        raise ConfigError(f"{name}: must be >= {low}, got {value!r}")
