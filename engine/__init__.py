"""What the prefill and decode workers share: model, KV cache, scheduler, sampling. No Ray, gRPC or Redis here."""

from pdserve.engine.config import ConfigError, EngineConfig, ModelConfig
from pdserve.engine.engine import Engine, RequestError
from pdserve.engine.request import FinishReason, Message, Prompt, PromptError, RequestOutput
from pdserve.engine.sampling_params import SamplingError, SamplingParams

__all__ = ["ConfigError", "Engine", "EngineConfig", "FinishReason", "Message", "ModelConfig", "Prompt", "PromptError",
           "RequestError", "RequestOutput", "SamplingError", "SamplingParams"]
