"""The cluster's configuration: one YAML file validated into frozen dataclasses.

    cfg = load_config("deploy/configs/local.yaml")

Every problem raises `ConfigError` with the field's dotted path and what was wrong ("workers.prefill.count: must
be >= 0, got -1"). Unknown keys are errors too, so a typo never silently falls back to a default. The `engine:`
section is `engine.config.EngineConfig`, shared by every worker; each pool can change its scheduler and KV cache
(`workers.prefill.engine`, `workers.decode.engine`), so that each phase is tuned for itself.

`cluster` holds the root and its small sections, `router` and `controller` their own sections, `reader` the
YAML and JSON reading.
"""

from pdserve.config.cluster import (
    KV_BACKENDS,
    SLO,
    ClusterConfig,
    EngineOverrides,
    Faults,
    KVTransfer,
    Mode,
    Pool,
    Resources,
    Workers,
)
from pdserve.config.controller import Controller
from pdserve.config.reader import (
    DEFAULT_CONFIG,
    config_from_json,
    config_to_json,
    load_config,
    parse_config,
    state_dir,
)
from pdserve.config.router import ROUTINGS, Router
from pdserve.engine.config import ConfigError

__all__ = [
    "DEFAULT_CONFIG", "KV_BACKENDS", "ROUTINGS", "SLO", "ClusterConfig", "ConfigError", "Controller",
    "EngineOverrides", "Faults", "KVTransfer", "Mode", "Pool", "Resources", "Router", "Workers", "config_from_json",
    "config_to_json", "load_config", "parse_config", "state_dir",
]
