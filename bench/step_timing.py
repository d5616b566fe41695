"""Wall times of GPU (or CPU) work for the GPU check: a call's best of a few runs, and an engine's decode step.

    best_of(3, lambda: dst.copy_(src), device)      # seconds, the device synchronized before and after each run
    decode_step_s(engine, prompts, steps=64)        # seconds, the median of `steps` decode steps of the batch
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from pdserve.engine import Engine, SamplingParams


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(repeats: int, fn: Callable[[], object], device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def decode_step_s(engine: Engine, prompts: Sequence[Sequence[int]], steps: int) -> float:
    """The median wall time of one decode step of `prompts` as a batch: their prefill first (not timed), then `steps`
    steps, each timed on its own, so that neither the prefill nor one noisy step moves the figure. (Subtracting a
    prefill-only run from a whole one, as the GPU check did before, gave negative times on a noisy CPU.)"""
    device = engine.kv_cache.tensor.device
    sampling = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    ids = [f"decode-step-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, sampling)
    begun: set[str] = set()
    while len(begun) < len(ids):  # prefill, until every request has its first token
        begun.update(output.request_id for output in engine.step() if output.token_ids)
    seconds = []
    while engine.has_unfinished():
        seconds.append(best_of(1, engine.step, device))
    return statistics.median(seconds)
