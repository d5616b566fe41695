"""A request's timings, measured at the router (with the workers' own queue and prefill figures)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Timings:
    queue_s: float
    """Accepted -> its prefill started (waiting at the router for room, then in the prefill worker's queue)."""
    prefill_s: float
    kv_transfer_s: float
    ttft_s: float
    tpot_s: float
    e2e_s: float
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefill worker's prefix cache (not computed)."""
    speculative_proposed: int = 0
    """Tokens speculative decoding proposed for it on its decode workers,"""
    speculative_accepted: int = 0
    """and of those the ones accepted (each accepted token saved a decode step)."""

    def as_fields(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()}


@dataclass
class RequestClock:
    accepted: float = field(default_factory=time.monotonic)
    dispatched: float | None = None
    """Sent to the worker that prefills it."""
    worker_queue_s: float = 0.0
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0
    cached_tokens: int = 0
    speculative_proposed: int = 0
    speculative_accepted: int = 0
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0
    finished: bool = False
    """The request ended with a finish reason (its last piece is built)."""

    def tokens_sent(self, count: int) -> float | None:
        """Returns the seconds since the previous tokens were sent (None for the first tokens, or for none)."""
        now = time.monotonic()
        gap = now - self.last_token if count and self.last_token is not None else None
        if count and self.first_token is None:
            self.first_token = now
        if count:
            self.last_token = now
        self.tokens += count
        return gap

    def timings(self) -> Timings:
        end = time.monotonic()
        first = self.first_token or end
        dispatched = self.dispatched or self.accepted
        tpot = (self.last_token - first) / (self.tokens - 1) if self.tokens > 1 and self.last_token else 0.0
        return Timings(queue_s=dispatched - self.accepted + self.worker_queue_s, prefill_s=self.prefill_s,
                       kv_transfer_s=self.kv_transfer_s, ttft_s=first - self.accepted, tpot_s=tpot,
                       e2e_s=end - self.accepted, cached_tokens=self.cached_tokens,
                       speculative_proposed=self.speculative_proposed, speculative_accepted=self.speculative_accepted)
