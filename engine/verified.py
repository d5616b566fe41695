"""What a speculative chunk's verify step leaves behind, for `Engine.step`: the tokens it emits and, for lookahead,
the accepted candidate's KV moved into place; and which requests may speculate at all.

A speculating request's chunk is its last token plus what the method proposed (`engine.speculation`); the runner
samples every row and keeps the proposals the model agrees with (`engine.rejection`, `engine.lookahead`). The engine
then appends the emitted tokens one by one, and counts as computed only the KV of the tokens it kept.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.logprobs import Sampled
from pdserve.engine.lookahead import LookaheadState
from pdserve.engine.prompt_lookup import pause_after
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledChunk


def may_speculate(config: EngineConfig, sampling: SamplingParams, prefill_only: bool) -> bool:
    """Speculative decoding keeps greedy output exact, and sampled output's distribution; requests it would change
    (logit changes, logprobs, grammars, a seed's reproducible stream) decode one token a step."""
    spec = config.speculative
    if not spec.enabled or config.simulated or prefill_only:
        return False
    if sampling.adjusts_logits or sampling.logprobs is not None or sampling.structured_output is not None:
        return False
    return sampling.greedy or (sampling.seed is None and spec.method != "lookahead")


def verified_tokens(chunk: ScheduledChunk, request: Request, picked: Sampled,
                    kv_cache: KVCache) -> tuple[tuple[int, ...], int]:
    """(the tokens the step emits for `request`, the proposals it checked). Lookahead advances the request's window
    and moves the accepted candidate's KV after the input; the other methods count the request's run of steps
    without an accepted proposal, which pauses its speculation (`prompt_lookup.pause_after`)."""
    if chunk.lookahead is not None:
        emitted, _ = request.lookahead.advance(chunk.lookahead, picked.picks)
        proposed = len(chunk.lookahead.candidates[0]) if chunk.lookahead.candidates else 0
        _move_accepted_kv(kv_cache, chunk, emitted)
        return tuple(emitted), proposed
    request.speculation_misses = request.speculation_misses + 1 if not picked.more else 0
    request.speculation_pause = pause_after(request.speculation_misses)
    return (picked.token_id, *picked.more), picked.proposed


def _move_accepted_kv(kv_cache: KVCache, chunk: ScheduledChunk, emitted: Sequence[int]) -> None:
    """A lookahead candidate's accepted tokens had their KV computed at their true positions over the true prefix,
    in the chunk's candidate slots: move it to the slots after the input, where it belongs."""
    rows = LookaheadState.accepted_rows(chunk.lookahead, emitted)
    if not rows:
        return
    size = kv_cache.block_size

    def slot(position: int) -> int:
        return chunk.block_ids[position // size] * size + position % size

    kv_cache.copy_slots([slot(chunk.start_pos + r) for r in rows],
                        [slot(chunk.start_pos + 1 + j) for j in range(len(rows))])
