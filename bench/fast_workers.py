"""The workers of the fast simulator (`bench.fast_simulator`): a prefill worker's queue of prompts and a decode
worker's batch (`bench.fast_batch`), its reservations and its preempted requests, as the few numbers that decide
their steps' times. No clock and no events here: the simulator asks a worker for its next step (prefill) or run of
steps (decode) and for its load at a time.

A decode step's seconds are affine in the batch's total context, which grows by the batch size per step, so a run of
k steps with the same sequences lasts k*alpha + beta*k*(k-1)/2; it ends at the next finish, or where the batch's
growth overflows the KV blocks (there the newest running requests are preempted, to be recomputed in chunks beside
the decode tokens when room allows, as the engine's scheduler does).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from dataclasses import dataclass

from pdserve.bench.fast_batch import Batch
from pdserve.controller.observation import PoolRole
from pdserve.engine.block_manager import blocks_for
from pdserve.engine.cost_model import CostModel
from pdserve.engine.engine import Engine


@dataclass(frozen=True)
class Shape:
    """What every worker of the cluster shares: its engine's limits and cost model."""

    cost: CostModel
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    per_context_s: float
    """Seconds a decode step adds per token of context (the KV read and the attention FLOPs)."""

    @classmethod
    def of(cls, engine: Engine) -> Shape:
        config, cost = engine.config, engine.cost_model

        def decode_step(batch: int, context: int) -> float:
            return cost.sums_cost(batch, context, context, batch).seconds

        per_context = (decode_step(1, 1 + 10 ** 6) - decode_step(1, 1)) / 10 ** 6
        return cls(cost, config.block_size, engine.blocks.num_blocks, config.max_num_seqs,
                   config.max_num_batched_tokens, per_context)


class PrefillWorker:
    """A prefill worker's queue of prompts, each [request, prompt tokens, tokens computed], oldest first."""

    role = PoolRole.PREFILL

    def __init__(self, worker_id: str, shape: Shape) -> None:
        self.worker_id, self.shape = worker_id, shape
        self.draining, self.available, self.busy = False, True, False
        self.jobs: deque[list[int]] = deque()
        self.in_flight = 0
        """Prompt tokens the router sent and has not seen prefilled (the policy's fresh view)."""
        self.queued = 0
        """Prompt tokens not computed yet (the heartbeat's queued_prefill_tokens)."""
        self.running = 0
        """Prompts part-way through their prefill."""
        self.held = self.held_blocks = 0
        """Prefilled requests whose KV is still being sent, and their blocks."""

    @property
    def has_requests(self) -> bool:
        return bool(self.jobs or self.held or self.in_flight)

    def schedule(self) -> tuple[list[int], float]:
        """One step: chunks from the oldest prompt on while the token budget and max_num_seqs allow; the requests
        whose prefill it completes and its seconds (0: nothing to do)."""
        budget, scheduled = self.shape.max_num_batched_tokens, 0
        new = context = pairs = 0
        done: list[int] = []
        for job in self.jobs:
            if budget == 0 or (job[2] == 0 and scheduled >= self.shape.max_num_seqs):
                break
            n = min(job[1] - job[2], budget)
            k = job[2] = job[2] + n
            new, context, pairs = new + n, context + k, pairs + n * k - (n * (n - 1) >> 1)
            budget, scheduled = budget - n, scheduled + 1
            if k == job[1]:
                done.append(job[0])
        for _ in done:
            self.jobs.popleft()
        self.queued -= new
        self.running = scheduled - len(done)
        return done, self.shape.cost.sums_cost(new, context, pairs, len(done)).seconds if new else 0.0

    def observe(self) -> tuple[int, int, int, int]:
        """(running, waiting, queued prompt tokens, KV blocks used), as its engine's load says."""
        partial = blocks_for(self.jobs[0][2], self.shape.block_size) if self.running else 0
        return (self.running + self.held, len(self.jobs) - self.running, self.queued,
                self.held_blocks + partial)


class DecodeWorker:
    """A decode worker's batch, its reservations, the requests joining it, and the requests its scheduler preempted
    (waiting, then recomputed in chunks beside the batch's decode tokens)."""

    role = PoolRole.DECODE

    def __init__(self, worker_id: str, shape: Shape) -> None:
        self.worker_id, self.shape = worker_id, shape
        self.draining, self.available, self.busy = False, True, False
        self.held = self.held_blocks = 0
        """Reserved for a prompt being prefilled elsewhere, and their blocks."""
        self.joining: list[tuple[int, int, int, int]] = []
        """(request, prompt tokens, tokens to decode, order): KV arrived during the current step."""
        self.joining_blocks = 0
        self.batch = Batch(shape.block_size)
        self.order_of: dict[int, int] = {}
        """Service order (reservation order) of every running request: the newest is preempted first."""
        self.newest: list[tuple[int, int]] = []
        """Heap of (-order, request) over running requests (entries of requests gone are skipped)."""
        self.waiting: list[tuple[int, int, int, int]] = []
        """Preempted: (order, request, tokens to recompute, tokens still to decode), in service order."""
        self.recomputing: dict[int, list[int]] = {}
        """Request -> [tokens to recompute, computed, tokens still to decode], in admission order."""
        self.recompute_blocks = 0
        self.chunks: list[tuple[int, int, int]] = []
        """The current step's recompute chunks: (request, new tokens, tokens computed after), when it has any (it is
        then a run of one)."""
        self.preemptions = 0
        self.step = 0
        """Steps run before the current run."""
        self.run_start = self.alpha = self.beta = 0.0
        self.run_steps = 0
        self.generation = 0
        """Tells the current run's end event from one that was cut short."""
        self.handing_on = False
        """Leaving with `hand_on_after_s` passed: what it decodes goes elsewhere at its next run boundary."""
        self._last_step = (-1, 0, 0.0, 0.0)
        """(generation, step, its start, its end) of the last `_step_at`, seconds into the run."""

    @property
    def has_requests(self) -> bool:
        return bool(self.batch.size or self.joining or self.held or self.waiting or self.recomputing)

    def commit(self, request: int, prompt: int, decode_tokens: int, order: int) -> None:
        """Its KV is here: a held reservation joins the batch at the next step."""
        blocks = blocks_for(prompt, self.shape.block_size)
        self.held, self.held_blocks = self.held - 1, self.held_blocks - blocks
        self.joining.append((request, prompt, decode_tokens, order))
        self.joining_blocks += blocks

    def start_run(self, now: float) -> float | None:
        """At a step boundary: preempt what the batch's growth does not fit, else recompute what waits; then run
        until the next finish or overflow (or one step, with recompute chunks). The run's end (None: nothing to
        run)."""
        g, preemptions, batch = self.step, self.preemptions, self.batch
        admit = not (self._room(g) < 0 and self._preempt_overflow(g))
        new = context = pairs = sampled = 0
        if self.waiting or self.recomputing:
            new, context, pairs, sampled = self._recompute_sums(g, admit)
        if not batch.size and not new:
            self.busy = False
            return None
        decode_context = batch.context(g)
        self.alpha = self.shape.cost.sums_cost(new + batch.size, context + decode_context, pairs + decode_context,
                                               sampled + batch.size).seconds
        if new:
            self.beta, self.run_steps = 0.0, 1
        else:
            self.beta = self.shape.per_context_s * batch.size
            admit_next = self.preemptions != preemptions and self.waiting  # room to admit at the next step?
            self.run_steps = self._overflow_step(g + 1, g + 1 if admit_next else batch.next_finish()) - g
        self.run_start, self.busy = now, True
        self.generation += 1
        return now + self._elapsed(self.run_steps)

    def cut_short(self, now: float) -> float | None:
        """A request joined: end the run at the next step boundary; that boundary's time (None: the run ends there
        anyway)."""
        x = now - self.run_start
        j = self._step_at(x)
        return self._cut(j if j > 0 and self._elapsed(j) >= x else j + 1)

    def cut_at_overflow(self, now: float) -> float | None:
        """A reservation took blocks: end the run where its growth no longer fits; that step's time, if earlier."""
        end = self.step + self.run_steps
        if not self.busy or self.chunks or self._room(end - 1) >= 0:
            return None
        g = self.step + self._step_at(now - self.run_start)
        return self._cut(self._overflow_step(g + 1, end) - self.step)

    def end_run(self) -> list[int]:
        """The run's steps are done: drop the requests they finished, take in those joining; the finished."""
        self.step += self.run_steps
        self.run_steps, self.busy = 0, False
        done = self.batch.finish(self.step)
        for request in done:
            del self.order_of[request]
        for request, _, tokens in self.chunks:
            job = self.recomputing[request]
            if job[1] < job[0]:
                continue
            del self.recomputing[request]
            self.recompute_blocks -= blocks_for(tokens, self.shape.block_size)
            if job[2] == 1:  # its recompute sampled its last token
                del self.order_of[request]
                done.append(request)
            else:
                self._join(request, tokens, job[2] - 1, self.order_of[request])
        self.chunks = []
        for joining in self.joining:
            self._join(*joining)
        self.joining, self.joining_blocks = [], 0
        return done

    def release_all(self) -> list[tuple[int, int]]:
        """At a run boundary, take out every request it decodes, recomputes or is about to take in (a leaving worker
        hands them on): (request, tokens it had still to produce), oldest in service order first."""
        left = [(self.order_of[r], r, self.batch.preempt(r, self.step)[1]) for r in list(self.batch.a_of)]
        left += [(order, r, remaining) for order, r, _, remaining in self.waiting]
        left += [(self.order_of[r], r, job[2]) for r, job in self.recomputing.items()]
        left += [(order, r, decode_tokens) for r, _, decode_tokens, order in self.joining]
        self.waiting, self.recomputing, self.joining, self.chunks, self.newest = [], {}, [], [], []
        self.recompute_blocks = self.joining_blocks = 0
        self.order_of.clear()
        return [(r, remaining) for _, r, remaining in sorted(left)]

    def load(self, now: float) -> tuple[int, int]:
        """(KV blocks used, requests held or running) as its engine says at `now`."""
        used = self.held_blocks + self.joining_blocks + self.recompute_blocks
        count = self.held + len(self.joining) + len(self.recomputing)
        batch = self.batch
        if not self.busy or not batch.size:
            return used, count
        generation, j, start, end = self._last_step  # `_step_at`, inlined for the router's many questions
        x = now - self.run_start
        if generation != self.generation or not start <= x + 1e-9 < end:
            j = self._step_at(x)
        g = self.step + j
        if g + 1 in batch.finishing:  # its last step: the requests it finishes have freed their blocks
            freed, freed_blocks = batch.freed_at(g)
            return used + batch.blocks(g) - freed_blocks, count + batch.size - freed
        return used + batch.blocks(g), count + batch.size

    def observe(self, now: float) -> tuple[int, int, int, int]:
        """(running, waiting, queued tokens to recompute, KV blocks used), as its engine's load says."""
        used, running = self.load(now)
        queued = sum(w[2] for w in self.waiting) + sum(j[0] - j[1] for j in self.recomputing.values())
        return running, len(self.waiting), queued, used

    def free_time(self, now: float) -> float:
        """When the batch next frees blocks or a slot, or next changes (inf when idle)."""
        if not self.busy:
            return math.inf
        end = self.run_start + self._elapsed(self.run_steps)
        if self.step + self.run_steps in self.batch.finishing:
            last = self.run_start + self._elapsed(self.run_steps - 1)
            if last > now:
                return last
        return end

    def _join(self, request: int, tokens: int, decode_tokens: int, order: int) -> None:
        self.batch.join(request, tokens, decode_tokens, self.step)
        self.order_of[request] = order
        heapq.heappush(self.newest, (-order, request))

    def _room(self, g: int) -> int:
        """Blocks free at step g once the members have grown."""
        return (self.shape.num_blocks - self.held_blocks - self.joining_blocks - self.recompute_blocks
                - self.batch.blocks(g))

    def _overflow_step(self, low: int, high: int) -> int:
        """The first step in [low, high) whose growth does not fit (high: none)."""
        if high <= low or self._room(high - 1) >= 0:
            return high
        while low < high:
            middle = (low + high) // 2
            if self._room(middle) < 0:
                high = middle
            else:
                low = middle + 1
        return low

    def _cut(self, k: int) -> float | None:
        if k >= self.run_steps:
            return None
        self.run_steps = k
        self.generation += 1
        return self.run_start + self._elapsed(k)

    # ---- preemption and recompute ----------------------------------------------------------------------------
    def _preempt_overflow(self, g: int) -> bool:
        """Preempt the newest running requests until the members' growth at step g fits; whether any was."""
        preempted = False
        while (self.batch.size or self.recomputing) and self._room(g) < 0 and self._preempt_newest(g) is not None:
            preempted = True
        return preempted

    def _preempt_newest(self, g: int) -> int | None:
        """Preempt the running request last in service order at step g: it waits to be recomputed."""
        while self.newest:
            _, request = heapq.heappop(self.newest)
            if request in self.batch:
                tokens, left = self.batch.preempt(request, g)
                bisect.insort(self.waiting, (self.order_of.pop(request), request, tokens, left))
            elif request in self.recomputing:
                job = self.recomputing.pop(request)
                self.recompute_blocks -= blocks_for(job[1], self.shape.block_size)
                bisect.insort(self.waiting, (self.order_of.pop(request), request, job[0], job[2]))
            else:
                continue
            self.preemptions += 1
            return request
        return None

    def _recompute_sums(self, g: int, admit: bool) -> tuple[int, int, int, int]:
        """Chunks for step g: the recomputes under way (a chunk without room preempts the newest, maybe itself), then,
        if `admit` and none was preempted, waiting requests oldest first; all within the token budget, the free blocks
        and max_num_seqs. The chunks' (new, context, pairs, sampled) sums."""
        budget, preempted = self.shape.max_num_batched_tokens - self.batch.size, not admit
        for request, job in list(self.recomputing.items()):
            if request not in self.recomputing:
                continue  # preempted for an older one's chunk
            n = min(job[0] - job[1], budget)
            if n <= 0:
                break
            grow = blocks_for(job[1] + n, self.shape.block_size) - blocks_for(job[1], self.shape.block_size)
            while grow > self._room(g) and self._preempt_newest(g) not in (None, request):
                preempted = True
            if request not in self.recomputing or grow > self._room(g):
                preempted = True
                continue
            budget -= self._chunk(request, job, n, grow)
        size = self.shape.block_size
        while not preempted and self.waiting and budget > 0 and (
                len(self.recomputing) + self.batch.size < self.shape.max_num_seqs):
            order, request, tokens, left = self.waiting[0]
            n = min(tokens, budget)
            if blocks_for(n, size) > self._room(g):
                break
            del self.waiting[0]
            job = self.recomputing[request] = [tokens, 0, left]
            self.order_of[request] = order
            heapq.heappush(self.newest, (-order, request))
            budget -= self._chunk(request, job, n, blocks_for(n, size))
        sums = [0, 0, 0, 0]
        for request, n, k in self.chunks:
            if request in self.recomputing:  # not preempted after its chunk was planned
                sums[0] += n
                sums[1] += k
                sums[2] += n * k - (n * (n - 1) >> 1)
                sums[3] += k == self.recomputing[request][0]
        self.chunks = [c for c in self.chunks if c[0] in self.recomputing]
        return sums[0], sums[1], sums[2], sums[3]

    def _chunk(self, request: int, job: list[int], n: int, grow: int) -> int:
        """Plan the next n tokens of a recompute, its KV growing by `grow` blocks; n."""
        k = job[1] = job[1] + n
        self.chunks.append((request, n, k))
        self.recompute_blocks += grow
        return n

    def _elapsed(self, k: int) -> float:
        """Seconds of the run's first k steps."""
        return k * self.alpha + self.beta * (k * (k - 1) / 2)

    def _step_at(self, x: float) -> int:
        """The step under way x seconds into the run (0 .. run_steps - 1); a step starting within a nanosecond of x
        counts as under way (x is a time that was computed as run_start + its start)."""
        x += 1e-9
        if self.run_steps <= 1 or x <= 0:
            return 0
        generation, j, start, end = self._last_step
        if generation == self.generation and start <= x:
            for _ in range(4):  # the router asks about every decode worker for every request: mostly a step on
                if x < end:
                    self._last_step = (generation, j, start, end)
                    return j
                if j + 1 == self.run_steps:
                    return j
                j, start = j + 1, end
                end = start + self.alpha + self.beta * j
        b = self.alpha - self.beta / 2
        j = min(max(int((math.sqrt(b * b + 2 * self.beta * x) - b) / self.beta), 0), self.run_steps - 1)
        while j > 0 and self._elapsed(j) > x:
            j -= 1
        while j + 1 < self.run_steps and self._elapsed(j + 1) <= x:
            j += 1
        self._last_step = (self.generation, j, self._elapsed(j), self._elapsed(j + 1))
        return j


Worker = PrefillWorker | DecodeWorker
