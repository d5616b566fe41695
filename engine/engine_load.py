"""An engine's load as its workers report it (`Engine.load`): what it runs and holds, its KV use, and its
counters since it started. Read by the worker's heartbeat and metrics, from any thread."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int
    held: int
    """Prefilled and waiting for the handoff, or reserved for a KV that is arriving."""
    queued_prefill_tokens: int
    """Prompt tokens still to compute (waiting requests and unfinished chunked prefills)."""
    kv_blocks_used: int
    kv_blocks_total: int
    prompt_tokens_total: int = 0
    """Prompt tokens of the requests started here since the engine started (`Engine.prompt_tokens_total`)."""
    cached_tokens_total: int = 0
    """Of those, tokens whose KV came from the prefix cache."""
    speculative_steps_total: int = 0
    speculative_proposed_total: int = 0
    speculative_accepted_total: int = 0
    """Speculative decoding since the engine started (`Engine.speculative_steps_total`, ...)."""
