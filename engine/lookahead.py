"""Lookahead decoding (Fu et al., 2024): speculation by Jacobi iteration with an n-gram pool, with no draft model.

Each speculating request keeps a window of guesses, `levels` (N - 1) rows of `width` (W) tokens: the trajectory of
its last N - 1 Jacobi iterations over the W positions ahead, and a pool of n-grams (a first token and the N - 1 that
followed it), seeded from the prompt and fed from the window. A decode step's chunk for it is

    [input]  the request's last token, at position p (the only one whose KV is not yet computed)
    [window] level l, column i (level-major), at position p + 1 + i + l; it sees the input, level 0's columns 0..i
             and levels 1..l of its own column: a causal sequence of guesses p + 1 .. p + 1 + i + l
    [candidates] up to G pool n-grams whose first token is the input: candidate g's token j at p + 1 + j, seeing
             the input and its own tokens 0..j

so every token attends to the request's context and to a causal path of its own (`mask`), at the positions it
claims (`positions`), while the KV slots follow the chunk's order. After the step (`advance`):

- verification: each candidate keeps its tokens while they equal the model's pick after the previous one (the
  input, then its own tokens); the longest such run wins and the model's pick after it follows, so 1 to N tokens
  are emitted and greedy output is exactly the one without speculation. The winner's KV was computed at its true
  positions over the true prefix, so `accepted_slots` names the slots it moves to;
- lookahead: the model's picks after the window's last level are the next Jacobi iteration; each column's
  trajectory (level 0 .. the new pick) is an n-gram for the pool; the window drops level 0 and takes the picks.

Greedy requests only. Decoding steps cost W * (N - 1) + G * (N - 1) extra rows: on hardware where extra rows are
free (a GPU at small batch) that is the price; on a CPU they are not (BENCHMARKS.md).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

POOL_PER_TOKEN = 8
"""N-grams kept per first token (the most recent)."""


@dataclass(frozen=True)
class Layout:
    """Where a lookahead chunk's parts are: one input token, then the window, then the candidates."""

    width: int
    levels: int
    candidates: tuple[tuple[int, ...], ...]
    """The candidates' tokens after the input (N - 1 each)."""

    @property
    def window_size(self) -> int:
        return self.width * self.levels

    def positions(self, start: int) -> list[int]:
        """Each token's position, the input at `start`."""
        window = [start + 1 + i + level for level in range(self.levels) for i in range(self.width)]
        return [start, *window, *(start + 1 + j for c in self.candidates for j in range(len(c)))]

    def mask(self) -> torch.Tensor:
        """[L, L] bool: which of the chunk's tokens each one sees (the context before it is seen by all)."""
        size = 1 + self.window_size + sum(len(c) for c in self.candidates)
        seen = torch.zeros(size, size, dtype=torch.bool)
        seen[:, 0] = True
        for level in range(self.levels):
            for i in range(self.width):
                row = self._window_row(level, i)
                seen[row, 1:2 + i] = True  # level 0, columns 0..i
                for upper in range(1, level + 1):
                    seen[row, self._window_row(upper, i)] = True
        row = 1 + self.window_size
        for candidate in self.candidates:
            for j in range(len(candidate)):
                seen[row + j, row:row + j + 1] = True
            row += len(candidate)
        return seen

    def _window_row(self, level: int, column: int) -> int:
        return 1 + level * self.width + column


@dataclass
class LookaheadState:
    """One request's window and n-gram pool."""

    width: int
    levels: int
    window: list[list[int]] = field(default_factory=list)
    """[levels][width] guesses, the oldest iteration first."""
    pool: dict[int, deque[tuple[int, ...]]] = field(default_factory=dict)

    @staticmethod
    def start(tokens: Sequence[int], width: int, levels: int) -> "LookaheadState":
        """A window of the context's last tokens (any guess will do; the iteration moves them), and a pool of the
        context's own n-grams."""
        state = LookaheadState(width, levels)
        tail = [tokens[(len(tokens) - width + i) % len(tokens)] for i in range(width)]
        state.window = [list(tail) for _ in range(levels)]
        for start in range(len(tokens) - levels):
            state.remember(tokens[start], tuple(tokens[start + 1:start + 1 + levels]))
        return state

    def remember(self, first: int, rest: tuple[int, ...]) -> None:
        found = self.pool.setdefault(first, deque(maxlen=POOL_PER_TOKEN))
        if rest in found:
            found.remove(rest)
        found.append(rest)

    def layout(self, last_token: int, max_candidates: int) -> Layout:
        """This step's chunk layout: the window and up to `max_candidates` n-grams from the last token."""
        candidates = tuple(reversed(self.pool.get(last_token, ())))[:max_candidates]  # the most recent first
        return Layout(self.width, self.levels, candidates)

    def tokens(self, layout: Layout) -> tuple[int, ...]:
        """The window's and the candidates' tokens, in the chunk's order (after the input)."""
        return tuple(t for level in self.window for t in level) + tuple(t for c in layout.candidates for t in c)

    def advance(self, layout: Layout, picks: Sequence[int]) -> tuple[tuple[int, ...], int]:
        """picks: the model's greedy token after each of the chunk's rows -> (the tokens emitted, the candidate
        tokens accepted among them). Moves the window one iteration on and feeds the pool."""
        emitted, accepted = self._verify(layout, picks)
        last_level = picks[1 + (self.levels - 1) * self.width:1 + self.levels * self.width]
        for i, new in enumerate(last_level):
            self.remember(self.window[0][i], tuple(self.window[level][i] for level in range(1, self.levels)) + (new,))
        self.window = self.window[1:] + [list(last_level)]
        return emitted, accepted

    def _verify(self, layout: Layout, picks: Sequence[int]) -> tuple[tuple[int, ...], int]:
        best: tuple[int, ...] = (picks[0],)
        row = 1 + layout.window_size
        for candidate in layout.candidates:
            previous, kept = picks[0], []
            for j, token in enumerate(candidate):
                if token != previous:
                    break
                kept.append(token)
                previous = picks[row + j]
            if len(kept) + 1 > len(best):
                best = (*kept, previous)
            row += len(candidate)
        return best, len(best) - 1

    @staticmethod
    def accepted_rows(layout: Layout, emitted: Sequence[int]) -> list[int]:
        """The chunk rows (after the input) whose KV the accepted candidate tokens left: those of the first
        candidate that starts with them."""
        accepted = tuple(emitted[:-1])
        row = 1 + layout.window_size
        for candidate in layout.candidates:
            if candidate[:len(accepted)] == accepted:
                return list(range(row, row + len(accepted)))
            row += len(candidate)
        return []
