"""A short fingerprint of the model an engine serves: the same on every worker that loaded the same checkpoint, and
different for another model of the same shape (SmolLM2's base and instruct weights, two random initialisations).

KV computed by one model is garbage to another even when every tensor shape matches, so the KV handoff checks it
(`kv_transfer.layout`): two workers whose fingerprints differ refuse to pair. It hashes the architecture and a
sample of the token embedding (read as float32, so bf16 and fp32 copies of a checkpoint agree up to bf16 rounding:
they are not the same weights and are told apart). Quantisation leaves the embedding as it is, so an int8 prefill
pool may hand KV to an fp32 decode pool.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from pdserve.engine.config import ModelConfig

EMBEDDING_SAMPLE = 16384
"""Leading elements of the embedding hashed (64 KiB as float32)."""


def model_fingerprint(config: ModelConfig, embedding: torch.Tensor | None) -> str:
    """16 hex digits; `embedding` None (a simulated engine has no weights) hashes the architecture alone."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(repr(dataclasses.astuple(config)).encode())
    if embedding is not None:
        sample = embedding.detach().reshape(-1)[:EMBEDDING_SAMPLE].to(device="cpu", dtype=torch.float32)
        digest.update(sample.contiguous().numpy().tobytes())
    return digest.hexdigest()
