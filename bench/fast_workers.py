"""The workers of the fast simulator (`bench.fast_simulator`): a prefill worker's queue of prompts and a decode
worker's batch, as the few numbers that decide their steps' times. No clock and no events here: the simulator asks
a worker for its next step (prefill) or run of steps (decode) and for its load at a time.

A decode worker's batch is sums, not per-sequence state. A sequence that joined at step j with a prompt of L tokens
holds a = L - j + g tokens of KV at step g, so the batch is its size, the sum of a, a histogram of a mod block_size
(its KV blocks at any step, in O(1)) and a heap of the steps at which sequences finish. A step's seconds are affine
in the batch's total context, which grows by the batch size per step, so a run of k steps with the same sequences
lasts k*alpha + beta*k*(k-1)/2.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from dataclasses import dataclass

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
    """A decode worker's batch as sums (see the module docstring), its reservations, the requests joining it, and
    the requests its scheduler preempted (waiting, then recomputed in chunks beside the batch's decode tokens)."""

    role = PoolRole.DECODE

    def __init__(self, worker_id: str, shape: Shape) -> None:
        self.worker_id, self.shape = worker_id, shape
        self.draining, self.available, self.busy = False, True, False
        self.held = self.held_blocks = 0
        """Reserved for a prompt being prefilled elsewhere, and their blocks."""
        self.joining: list[tuple[int, int, int, int]] = []
        """(request, prompt tokens, tokens to decode, order): KV arrived during the current step."""
        self.joining_blocks = 0
        self.members = self.a_sum = self.q_sum = 0
        self.residues = [0] * shape.block_size
        """How many members have a = q * block_size + r, per r."""
        self.a_of: dict[int, int] = {}
        self.order_of: dict[int, int] = {}
        """Service order (reservation order) of every running request: the newest is preempted first."""
        self.newest: list[tuple[int, int]] = []
        """Heap of (-order, request) over running requests (entries of requests gone are skipped)."""
        self.done_of: dict[int, int] = {}
        self.finishing: dict[int, list[int]] = {}
        """Step g -> the members that are done once g steps have run."""
        self.finish_steps: list[int] = []
        self.waiting: list[tuple[int, int, int, int]] = []
        """Preempted: (order, request, tokens to recompute, tokens still to decode), in service order."""
        self.recomputing: dict[int, list[int]] = {}
        """Request -> [tokens to recompute, computed, tokens still to decode], in admission order."""
        self.recompute_blocks = 0
        self.chunks: list[tuple[int, int]] = []
        """The current step's recompute chunks: (request, tokens), when it has any (it is then a run of one)."""
        self.preemptions = 0
        self.step = 0
        """Steps run before the current run."""
        self.run_start = self.alpha = self.beta = 0.0
        self.run_steps = 0
        self.generation = 0
        """Tells the current run's end event from one that was cut short."""
        self._last_step = (-1, 0, 0.0, 0.0)
        """(generation, step, its start, its end) of the last `_step_at`, seconds into the run."""

    @property
    def has_requests(self) -> bool:
        return bool(self.members or self.joining or self.held or self.waiting or self.recomputing)

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
        while self.finish_steps and self.finish_steps[0] not in self.finishing:
            heapq.heappop(self.finish_steps)
        g = self.step
        preempted = self._preempt_overflow(g)
        new, context, pairs, sampled = self._recompute_sums(g) if not preempted else (0, 0, 0, 0)
        if not self.members and not new:
            self.busy = False
            return None
        batch = self.members
        decode_context = self.a_sum + batch * g + batch
        self.alpha = self.shape.cost.sums_cost(new + batch, context + decode_context, pairs + decode_context,
                                               sampled + batch).seconds
        if new:
            self.beta, self.run_steps = 0.0, 1
        else:
            self.beta = self.shape.per_context_s * batch
            until = g + 1 if preempted and self.waiting else self.finish_steps[0]  # room to admit at the next step?
            self.run_steps = self._overflow_step(g + 1, until) - g
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
        if not self.busy or self.chunks:
            return None
        g = self.step + self._step_at(now - self.run_start)
        return self._cut(self._overflow_step(g + 1, self.step + self.run_steps) - self.step)

    def end_run(self) -> list[int]:
        """The run's steps are done: drop the requests they finished, take in those joining; the finished."""
        self.step += self.run_steps
        self.run_steps, self.busy = 0, False
        done: list[int] = []
        if self.finish_steps and self.finish_steps[0] == self.step:
            heapq.heappop(self.finish_steps)
            done = self.finishing.pop(self.step, [])
            for request in done:
                self._leave(request)
        for request, tokens in self.chunks:
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

    def load(self, now: float) -> tuple[int, int]:
        """(KV blocks used, requests held or running) as its engine says at `now`."""
        used = self.held_blocks + self.joining_blocks + self.recompute_blocks
        count = self.held + len(self.joining) + len(self.recomputing)
        if not self.busy or not self.members:
            return used, count
        g = self.step + self._step_at(now - self.run_start)
        blocks = self._blocks(g)
        count += self.members
        if self.finish_steps[0] == g + 1:  # its last step: the requests it finishes have freed their blocks
            for request in self.finishing.get(g + 1, ()):
                blocks -= (self.a_of[request] + g) // self.shape.block_size + 1
                count -= 1
        return used + blocks, count

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
        if self.finish_steps and self.finish_steps[0] == self.step + self.run_steps:
            last = self.run_start + self._elapsed(self.run_steps - 1)
            if last > now:
                return last
        return end

    # ---- the batch's sums ------------------------------------------------------------------------------------
    def _join(self, request: int, prompt: int, decode_tokens: int, order: int) -> None:
        a = prompt - self.step
        self.a_of[request] = a
        self.order_of[request] = order
        heapq.heappush(self.newest, (-order, request))
        self._account(a, 1)
        done = self.done_of[request] = self.step + decode_tokens
        if done not in self.finishing:
            self.finishing[done] = []
            heapq.heappush(self.finish_steps, done)
        self.finishing[done].append(request)

    def _leave(self, request: int) -> int:
        """Out of the batch (finished or preempted); its a."""
        a = self.a_of.pop(request)
        self._account(a, -1)
        del self.order_of[request]
        del self.done_of[request]
        return a

    def _account(self, a: int, sign: int) -> None:
        laps, residue = divmod(a, self.shape.block_size)
        self.members += sign
        self.a_sum += sign * a
        self.q_sum += sign * laps
        self.residues[residue] += sign

    def _blocks(self, g: int) -> int:
        """KV blocks of every member at step g, each grown for the token it computes then."""
        size = self.shape.block_size
        laps, offset = divmod(g, size)
        return self.members * (1 + laps) + self.q_sum + (sum(self.residues[size - offset:]) if offset else 0)

    def _room(self, g: int) -> int:
        """Blocks free at step g once the members have grown."""
        return (self.shape.num_blocks - self.held_blocks - self.joining_blocks - self.recompute_blocks
                - (self._blocks(g) if self.members else 0))

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
        while self.newest and (self.members or self.recomputing) and self._room(g) < 0:
            _, request = heapq.heappop(self.newest)
            if request in self.a_of:
                done = self.done_of[request]
                self.finishing[done].remove(request)
                if not self.finishing[done]:
                    del self.finishing[done]
                order = self.order_of[request]
                tokens = self._leave(request) + g + 1
                bisect.insort(self.waiting, (order, request, tokens, done - g))
            elif request in self.recomputing:
                job = self.recomputing.pop(request)
                self.recompute_blocks -= blocks_for(job[1], self.shape.block_size)
                bisect.insort(self.waiting, (self.order_of.pop(request), request, job[0], job[2]))
            else:
                continue
            self.preemptions += 1
            preempted = True
        return preempted

    def _recompute_sums(self, g: int) -> tuple[int, int, int, int]:
        """Chunks for step g: the recomputes under way, then waiting requests admitted, oldest first, within the
        token budget, the free blocks and max_num_seqs; their (new, context, pairs, sampled) sums."""
        budget, room = self.shape.max_num_batched_tokens - self.members, self._room(g)
        sums = [0, 0, 0, 0]
        for request, job in self.recomputing.items():
            grow = self._chunk(request, job, budget, room, sums)
            if grow < 0:
                return tuple(sums)
            budget, room = self.shape.max_num_batched_tokens - self.members - sums[0], room - grow
        size = self.shape.block_size
        while self.waiting and budget > 0 and len(self.recomputing) + self.members < self.shape.max_num_seqs:
            order, request, tokens, left = self.waiting[0]
            if blocks_for(min(tokens, budget), size) > room:
                break
            del self.waiting[0]
            job = self.recomputing[request] = [tokens, 0, left]
            self.order_of[request] = order
            heapq.heappush(self.newest, (-order, request))
            room -= self._chunk(request, job, budget, room, sums)
            budget = self.shape.max_num_batched_tokens - self.members - sums[0]
        return tuple(sums)

    def _chunk(self, request: int, job: list[int], budget: int, room: int, sums: list[int]) -> int:
        """Schedule the next chunk of a recompute into `sums`; the blocks it grows by (-1: it does not fit)."""
        size = self.shape.block_size
        n = min(job[0] - job[1], budget)
        grow = blocks_for(job[1] + n, size) - blocks_for(job[1], size)
        if n <= 0 or grow > room:
            return -1
        k = job[1] = job[1] + n
        self.chunks.append((request, k))
        self.recompute_blocks += grow
        sums[0] += n
        sums[1] += k
        sums[2] += n * k - (n * (n - 1) >> 1)
        sums[3] += k == job[0]
        return grow

    def _elapsed(self, k: int) -> float:
        """Seconds of the run's first k steps."""
        return k * self.alpha + self.beta * (k * (k - 1) / 2)

    def _step_at(self, x: float) -> int:
        """The step under way x seconds into the run (0 .. run_steps - 1); a step starting within a nanosecond of x
        counts as under way (x is a time that was computed as run_start + its start)."""
        x += 1e-9
        if self.run_steps <= 1 or x <= 0:
            return 0
        last = self._last_step
        if last[0] == self.generation and last[2] <= x < last[3]:
            return last[1]  # asked again within one step (the router asks for every request it places)
        b = self.alpha - self.beta / 2
        j = min(max(int((math.sqrt(b * b + 2 * self.beta * x) - b) / self.beta), 0), self.run_steps - 1)
        while j > 0 and self._elapsed(j) > x:
            j -= 1
        while j + 1 < self.run_steps and self._elapsed(j + 1) <= x:
            j += 1
        self._last_step = (self.generation, j, self._elapsed(j), self._elapsed(j + 1))
        return j

Worker = PrefillWorker | DecodeWorker
