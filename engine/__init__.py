"""What the prefill and decode workers share: model, KV cache, scheduler, sampling. No Ray, gRPC or Redis here.

The names below load on first use: `from pdserve.engine import EngineConfig` (as the CLI and the config reader do)
does not import torch and the model code that `Engine` needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.engine.config import ConfigError, EngineConfig, ModelConfig
    from pdserve.engine.engine import Engine, RequestError
    from pdserve.engine.request import FinishReason, Message, Prompt, PromptError, RequestOutput
    from pdserve.engine.sampling_params import SamplingError, SamplingParams

_HOMES = {"ConfigError": "config", "EngineConfig": "config", "ModelConfig": "config", "Engine": "engine",
          "RequestError": "engine", "FinishReason": "request", "Message": "request", "Prompt": "request",
          "PromptError": "request", "RequestOutput": "request", "SamplingError": "sampling_params",
          "SamplingParams": "sampling_params"}

__all__ = ["ConfigError", "Engine", "EngineConfig", "FinishReason", "Message", "ModelConfig", "Prompt", "PromptError",
           "RequestError", "RequestOutput", "SamplingError", "SamplingParams"]


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pdserve.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pdserve.engine.{home}"), name)
