"""Reading the cluster's config: a YAML file (or the JSON a running cluster keeps) validated into `ClusterConfig`.

Every problem raises `ConfigError` with the field's dotted path and what was wrong ("workers.prefill.count: must
be >= 0, got -1"). Unknown keys are errors too, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Mapping
from typing import Any

import yaml

from pdserve.config.cluster import ClusterConfig
from pdserve.engine.config import ConfigError, EngineConfig

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "configs",
                              "local.yaml")


def state_dir() -> str:
    """Where this machine keeps a cluster's local state (its state file, log and the Batch API's files):
    $PDSERVE_STATE_DIR, or ~/.cache/pdserve/run."""
    return os.environ.get("PDSERVE_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pdserve", "run")


def config_to_json(config: ClusterConfig) -> str:
    """The config as JSON that `config_from_json` (and `parse_config`) read back to an equal config."""
    return json.dumps(_plain(config))


def config_from_json(text: str) -> ClusterConfig:
    return parse_config(json.loads(text))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def load_config(path: str | None = None) -> ClusterConfig:
    """Read and validate a YAML file (the default: deploy/configs/local.yaml)."""
    path = path or DEFAULT_CONFIG
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"config file {path!r}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r}: not valid YAML: {e}") from e
    return parse_config(values)


def parse_config(values: Any) -> ClusterConfig:
    return _build(ClusterConfig, values, "")


def _build(cls: type, values: Any, path: str) -> Any:
    """A frozen dataclass from a mapping, recursively; errors name the dotted field path."""
    if cls is EngineConfig:
        return EngineConfig.from_dict(values if values is not None else {})
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path or 'config'}: must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{name}: unknown field (known: {', '.join(sorted(fields))})")
        kwargs[key] = _value(fields[key], value, name)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # the dataclass names its own field; add where it sits
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None


def _value(f: dataclasses.Field, value: Any, name: str) -> Any:
    annotation = str(f.type)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(default):
        return _build(type(default), value, name)
    if isinstance(default, enum.Enum):
        try:
            return type(default)(value)
        except ValueError:
            raise ConfigError(f"{name}: {value!r} is not one of {[m.value for m in type(default)]}") from None
    optional = annotation.endswith("| None")
    if value is None and optional:
        return None
    base = annotation.split("|")[0].strip()
    if base == "str" and isinstance(value, str):
        return value
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base.startswith("dict") and isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise ConfigError(f"{name}: expected {base}, got {type(value).__name__} {value!r}")
