"""A decode worker's running sequences as sums, for the fast simulator (`bench.fast_workers.DecodeWorker`): what a
step costs and how many KV blocks the batch holds, in O(1) whatever its size.

A sequence that joined at step j with L tokens of KV holds a = L - j + g tokens at step g and computes one more, so
the batch is its size, the sum of a (a step's context: sum(a) + size * (g + 1)), the sum of a // block_size with a
histogram of a % block_size (its blocks at step g, each grown for the token it computes then), and a heap of the
steps at which sequences finish.
"""

from __future__ import annotations

import heapq


class Batch:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.size = self.a_sum = self.q_sum = 0
        self.residues = [0] * block_size
        """How many sequences have a % block_size == r, per r."""
        self.a_of: dict[int, int] = {}
        self.done_of: dict[int, int] = {}
        self.finishing: dict[int, list[int]] = {}
        """Step g -> the sequences that are done once g steps have run."""
        self.finish_steps: list[int] = []
        """Heap of the keys of `finishing`, and of some no longer there (finished, or emptied by preemption)."""

    def __contains__(self, request: int) -> bool:
        return request in self.a_of

    def join(self, request: int, tokens: int, decode_tokens: int, step: int) -> None:
        """`request` decodes from `step` on with `tokens` tokens of KV, for `decode_tokens` steps."""
        a = self.a_of[request] = tokens - step
        self._account(a, 1)
        done = self.done_of[request] = step + decode_tokens
        if done not in self.finishing:
            self.finishing[done] = []
            heapq.heappush(self.finish_steps, done)
        self.finishing[done].append(request)

    def finish(self, step: int) -> list[int]:
        """Drop the sequences done once `step` steps have run; those. (Its key leaves the heap in `next_finish`.)"""
        done = self.finishing.pop(step, [])
        for request in done:
            self._account(self.a_of.pop(request), -1)
            del self.done_of[request]
        return done

    def preempt(self, request: int, step: int) -> tuple[int, int]:
        """Drop `request` at `step`: its tokens to recompute (KV and its last token) and tokens still to decode."""
        done = self.done_of.pop(request)
        self.finishing[done].remove(request)
        if not self.finishing[done]:
            del self.finishing[done]
        a = self.a_of.pop(request)
        self._account(a, -1)
        return a + step + 1, done - step

    def next_finish(self) -> int:
        """The first step after which a sequence is done."""
        while self.finish_steps[0] not in self.finishing:
            heapq.heappop(self.finish_steps)
        return self.finish_steps[0]

    def context(self, step: int) -> int:
        """Tokens a decode step at `step` attends to (each sequence's KV and its new token), over the batch."""
        return self.a_sum + self.size * (step + 1)

    def blocks(self, step: int) -> int:
        """KV blocks of the batch at `step`, each sequence grown for the token it computes then."""
        if not self.size:
            return 0
        size = self.block_size
        laps, offset = divmod(step, size)
        return self.size * (1 + laps) + self.q_sum + (sum(self.residues[size - offset:]) if offset else 0)

    def freed_at(self, step: int) -> tuple[int, int]:
        """(sequences, blocks) that step `step` finishes, freed at its start."""
        done = self.finishing.get(step + 1, ())
        return len(done), sum((self.a_of[r] + step) // self.block_size + 1 for r in done)

    def _account(self, a: int, sign: int) -> None:
        laps, residue = divmod(a, self.block_size)
        self.size += sign
        self.a_sum += sign * a
        self.q_sum += sign * laps
        self.residues[residue] += sign
