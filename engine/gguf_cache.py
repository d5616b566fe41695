"""A GGUF file converted once into a cache folder: model shape (JSON), dequantized weights (safetensors), tokenizer.

Parsing a GGUF file's metadata with the `gguf` package takes ~8 s for a 49k-token vocabulary and dequantizing
another few seconds; a cached folder loads in about a second. The folder lives under `$PDSERVE_CACHE_DIR`
(default `~/.cache/pdserve`), keyed by the file's absolute path, size and mtime, and is written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile

from pdserve.engine.config import ModelConfig, RopeScaling

log = logging.getLogger(__name__)

CONFIG_FILE = "pdserve_model.json"
WEIGHTS_FILE = "model.safetensors"


def cache_root() -> str:
    return os.environ.get("PDSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pdserve")


def cache_folder(gguf_path: str) -> str:
    stat = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}:{stat.st_size}:{stat.st_mtime_ns}"
    return os.path.join(cache_root(), "gguf", hashlib.sha256(key.encode()).hexdigest()[:16])


def converted(gguf_path: str) -> str:
    """The cache folder of a GGUF file, converting the file first if needed."""
    folder = cache_folder(gguf_path)
    if not os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
        _convert(gguf_path, folder)
    return folder


def read_cached_config(folder: str) -> ModelConfig:
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        values = json.load(f)
    scaling = values.pop("rope_scaling")
    values["eos_token_ids"] = tuple(values["eos_token_ids"])
    return ModelConfig(**values, rope_scaling=None if scaling is None else RopeScaling(**scaling))


def _convert(gguf_path: str, folder: str) -> None:
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from pdserve.engine.gguf_weights import read_config, read_tensors

    log.info("converting %s once into %s", gguf_path, folder)
    reader = GGUFReader(gguf_path)
    cfg = read_config(reader)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(folder))
    save_file(dict(read_tensors(reader, cfg)), os.path.join(staging, WEIGHTS_FILE))
    with open(os.path.join(staging, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, folder)
    except OSError:  # another process converted it first; its copy is the same
        shutil.rmtree(staging, ignore_errors=True)
