"""Expected output length by prompt length: how the controller sizes decode for what is arriving, not what finished.

A request's output length is known only when it finishes, a whole lifetime after it arrived, so output lengths from
the window's finished requests lag a change in the mix: after summaries give way to chat, they still say 150 tokens
while 250-token answers pile onto the decode pool. A prompt's length is known the moment it arrives, and in a mix of
workloads it says which workload a request belongs to (short chat prompts, 4k-token documents). So the controller
remembers the mean output length per prompt-length class (powers of two), learned from every finished request, and
predicts the arrivals' output length from their classes:

    class(prompt)     = floor(log2(prompt tokens)), capped at NUM_CLASSES - 1
    learned[c]       <- learned[c] + w * (window mean of c - learned[c]),   w = n_c / (n_c + MEMORY)
    expected output   = sum(arrived[c] * learned[c]) / sum(arrived[c])      over the classes learned so far

The memory is in requests, not time (a finished request counts once per tick whose window holds it): a class not
seen for minutes (chat during a summarisation phase) keeps what it learned. When fewer than MIN_COVERAGE of the
arrivals fall in learned classes, there is no prediction (NaN) and the window's finished lengths are used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

NUM_CLASSES = 20
"""Classes 0..19: prompts up to 2^20 tokens apart; longer ones share the last class."""
MEMORY = 50
"""Finished requests a class's estimate is worth: a window of n of them moves it by n / (n + MEMORY)."""
MIN_COVERAGE = 0.8
"""Share of the arrivals that must fall in learned classes for a prediction."""
UNSEEN = 0.0
"""A class no finished request has fallen in yet (every output has at least one token)."""


def prompt_class(prompt_tokens: int) -> int:
    return min(max(int(prompt_tokens), 1).bit_length() - 1, NUM_CLASSES - 1)


def class_counts(prompt_lengths: Iterable[int]) -> tuple[int, ...]:
    """How many prompts fall in each class."""
    counts = [0] * NUM_CLASSES
    for tokens in prompt_lengths:
        counts[prompt_class(tokens)] += 1
    return tuple(counts)


def class_means(lengths: Iterable[tuple[int, int]]) -> tuple[tuple[int, float], ...]:
    """(count, mean output tokens) per class of (prompt tokens, output tokens) pairs; (0, NaN) for an empty class."""
    counts, sums = [0] * NUM_CLASSES, [0] * NUM_CLASSES
    for prompt, output in lengths:
        c = prompt_class(prompt)
        counts[c] += 1
        sums[c] += output
    return tuple((n, s / n if n else math.nan) for n, s in zip(counts, sums))


def learn(learned: Sequence[float], window: Sequence[tuple[int, float]]) -> tuple[float, ...]:
    """Move each class's learned output length toward the window's mean for it, by how many it saw."""
    old = list(learned) if len(learned) == NUM_CLASSES else [UNSEEN] * NUM_CLASSES
    for c, (n, mean) in enumerate(window):
        if n == 0:
            continue
        if old[c] == UNSEEN:
            old[c] = mean
        else:
            old[c] += n / (n + MEMORY) * (mean - old[c])
    return tuple(old)


def expected_output(learned: Sequence[float], arrived: Sequence[int]) -> float:
    """The arrivals' mean output length from their classes; NaN when too few fall in learned classes."""
    if len(learned) != NUM_CLASSES or not arrived:
        return math.nan
    known = [(n, learned[c]) for c, n in enumerate(arrived) if n and learned[c] != UNSEEN]
    covered = sum(n for n, _ in known)
    total = sum(arrived)
    if total == 0 or covered < MIN_COVERAGE * total:
        return math.nan
    return sum(n * mean for n, mean in known) / covered
