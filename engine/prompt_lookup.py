"""Prompt lookup, the engine's first kind of speculative decoding: proposals copied from the request's own tokens, and
the rule that keeps only the proposals the model would have picked.

Life of a speculating request (no logit changes; `engine.config.SpeculativeSettings`): each decode step the
scheduler asks `propose` for up to k tokens, the ones that followed the latest earlier occurrence of the sequence's
last n tokens (n = 3, then 2; a single token matches too often by chance to be worth checking); its chunk is the last
token plus the proposals, computed in one forward pass like a short prefill. The model's pick after each position
(`verify`) keeps the proposals up to the first it would not have chosen, and adds its own token there, so a step
emits 1 to k + 1 tokens and the output is exactly the one without speculation. (A sampled request keeps each
proposal with the probability the model gives it, `engine.rejection`, so its output keeps its distribution.) The KV
of rejected proposals is left behind the request's computed length, to be overwritten. A request whose proposals
were all rejected twice in a row waits 1, then 3, 7, ... steps (at most `MAX_PAUSE`) before it proposes again
(`pause_after`): text that copies nothing costs few wasted steps, and text that copies again after a change loses
little.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_NGRAM = 3
MIN_NGRAM = 2
MAX_PAUSE = 15


def propose(tokens: Sequence[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> tuple[int, ...]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens (longest n first, down to
    `min_ngram`); () when the tail occurs nowhere before."""
    tokens = tuple(tokens)
    length = len(tokens)
    if k <= 0:
        return ()
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = tokens[length - n:]
        for start in range(length - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return ()


def verify(proposed: Sequence[int], picks: Sequence[int]) -> tuple[int, ...]:
    """picks[i]: the model's token after the chunk's i-th position (its last token, then each proposal), so
    len(picks) == len(proposed) + 1. The tokens emitted: the proposals the model agrees with, then its own pick."""
    emitted = []
    for proposal, pick in zip(proposed, picks):
        emitted.append(pick)
        if pick != proposal:
            return tuple(emitted)
    emitted.append(picks[len(proposed)])
    return tuple(emitted)


def pause_after(misses: int) -> int:
    """Steps a request skips proposing after `misses` steps in a row whose proposals were all rejected."""
    return 0 if misses < 2 else min(2 ** (misses - 1) - 1, MAX_PAUSE)
