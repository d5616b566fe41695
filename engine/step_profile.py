"""A measured performance model of one engine: a few timed steps fitted to straight lines.

The ratio controller needs to know how long a prefill and a decode step take (`controller.perf_model.PerfModel`).
A sim engine has its cost model; a real engine is profiled here, once, on synthetic token ids:

    prefill_seconds(n)          = prefill_fixed_s + n * prefill_s_per_token             (two prompt lengths)
    decode_step_seconds(b, k)   = decode_fixed_s + b * decode_s_per_seq + b * k * decode_s_per_kv_token

The decode terms come from steps at two batch sizes and two context lengths. Each measurement is the median of a few
steps, so one slow step on a shared machine does not skew the fit. Profiling aborts what it added: the engine is
left as it was (it must be idle). Prefix caching is off while it profiles: the repeated synthetic prompts would
otherwise come from the cache, and the fit would time lookups instead of compute.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams

PROFILE_TOKEN = 1000


@dataclass(frozen=True)
class StepProfile:
    prefill_fixed_s: float
    prefill_s_per_token: float
    decode_fixed_s: float
    decode_s_per_seq: float
    decode_s_per_kv_token: float

    def prefill_seconds(self, prompt_tokens: int) -> float:
        return self.prefill_fixed_s + prompt_tokens * self.prefill_s_per_token

    def decode_step_seconds(self, batch: int, context_len: int) -> float:
        if batch <= 0:
            return 0.0
        return self.decode_fixed_s + batch * (self.decode_s_per_seq + context_len * self.decode_s_per_kv_token)


class EngineBusy(RuntimeError):
    """The engine has requests: its steps cannot be timed alone now."""


def profile_engine(engine: Engine, short: int = 64, long: int = 256, batches: tuple[int, int] = (1, 8),
                   repeats: int = 3) -> StepProfile:
    """Time prefills of `short` and `long` tokens and decode steps at two batch sizes and two contexts."""
    if engine.num_requests:
        raise EngineBusy("profile_engine: the engine must be idle")
    caching, engine.blocks.caching = engine.blocks.caching, False
    try:
        return _profile(engine, short, long, batches, repeats)
    finally:
        engine.blocks.caching = caching


def _profile(engine: Engine, short: int, long: int, batches: tuple[int, int], repeats: int) -> StepProfile:
    p_short, p_long = (_prefill(engine, n, repeats) for n in (short, long))
    per_token = max(0.0, (p_long - p_short) / (long - short))
    small, large = batches
    d_small = _decode(engine, small, short, repeats)
    d_large = _decode(engine, large, short, repeats)
    d_large_long = _decode(engine, large, long, repeats)
    per_kv = max(0.0, (d_large_long - d_large) / (large * (long - short)))
    per_seq = max(0.0, (d_large - d_small) / (large - small) - short * per_kv)
    fixed = max(0.0, d_small - small * (per_seq + short * per_kv))
    return StepProfile(prefill_fixed_s=max(0.0, p_short - short * per_token), prefill_s_per_token=per_token,
                       decode_fixed_s=fixed, decode_s_per_seq=per_seq, decode_s_per_kv_token=per_kv)


def _prefill(engine: Engine, tokens: int, repeats: int) -> float:
    times = []
    for i in range(repeats):
        request_id = f"profile-prefill-{tokens}-{i}"
        engine.add_request(request_id, [PROFILE_TOKEN] * tokens, SamplingParams(max_tokens=1, ignore_eos=True))
        started = time.perf_counter()
        while engine.num_requests:
            engine.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _decode(engine: Engine, batch: int, context: int, repeats: int) -> float:
    ids = [f"profile-decode-{batch}-{context}-{i}" for i in range(batch)]
    sampling = SamplingParams(max_tokens=64 + repeats, ignore_eos=True)  # none ends while the others prefill
    for request_id in ids:
        engine.add_request(request_id, [PROFILE_TOKEN] * context, sampling)
    try:
        while any(engine.computed_tokens(r) < context for r in ids):  # prefill (untimed)
            engine.step()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        for request_id in ids:
            engine.abort(request_id)
