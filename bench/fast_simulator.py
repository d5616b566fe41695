"""A fast step-level model of a disaggregated cluster (`pdserve plan --fast`): `SimSetup` in, `SimResult` out, as
`bench.simulator.Simulation`, at a cost that grows with steps and requests, never with tokens. This module owns the
clock, the router and the controller; the workers' models are in `bench.fast_workers`.

- router: `router.policy`'s load-only orders, as the exact simulator feeds them: the decode worker with the most free
  KV blocks (then fewest requests, then id) reserves the prompt's blocks, and the queue waits, oldest first, while it
  has no room (`max_num_seqs` or blocks); the prefill worker with the fewest prompt tokens in flight.
- prefill worker: chunks under `max_num_batched_tokens` (and `max_num_seqs`), oldest prompt first, one event per
  step, its seconds `CostModel.sums_cost` of the chunks as `SimRunner` sums them.
- KV handoff: the prompt's blocks over the link (`streamed_transfer_seconds` with layerwise), then the request joins
  the decode batch at its next step.
- decode worker: a run of steps with the same sequences is one event, ended by the next finish or overflow, or cut
  short at the step after a handoff; a finishing request frees its slot and blocks at the start of its last step.
  When the batch's growth overflows the blocks, the newest requests are preempted and later recomputed in chunks
  beside the decode tokens, as the scheduler does.
- controller: the same policy `tick` on an `Observation` built as the exact simulator builds it; MOVE drains, then
  `role_switch_s` before serving the other pool; ADD serves after `worker_start_s`; REMOVE drains and leaves. With
  `hand_on_after_s`, a decode worker still decoding that long into its drain hands its requests on at its next step
  boundary: each goes back to the front of the router's queue, its tokens so far joined to its prompt (the router's
  `migration.continuation`), as in the exact simulator.

Refused (a `ValueError` names the setting): prefix caching on a trace with prefix ids (KV-aware routing with it),
`engine.speculative`. Not modelled: a preempted request resuming from its own cached blocks (with
`engine.prefix_caching` the engine may; here it recomputes them all), the prefill workers' KV blocks (never short: a
step adds at most `max_num_batched_tokens`), `max_model_len`, ITLs (`itl_s` is empty). The live router retries after
every step; here the queue retries when room is freed, so a choice that changes only because batches grew is seen at
the next freeing.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from pdserve.bench.fast_views import records, worker_observation
from pdserve.bench.fast_workers import DecodeWorker, PrefillWorker, Shape, Worker
from pdserve.bench.sim_setup import PoolSample, SimResult, SimSetup
from pdserve.bench.workloads import TraceEntry
from pdserve.controller.decision import Decision
from pdserve.controller.observation import Observation, PoolRole
from pdserve.controller.output_lengths import class_counts
from pdserve.controller.policy import PolicyContext, load_policy, within_budget
from pdserve.controller.window import Finished, traffic_window
from pdserve.engine.block_manager import blocks_for
from pdserve.engine.engine import Engine

HAND_ON_RECHECK_S = 1.0
"""A leaving decode worker that still holds reservations is checked again this much later (the exact simulator's
interval; the live control plane asks every `IDLE_POLL_S`)."""
WINDOW_RECORDS = 5000
"""The controller's window reads at most this many of the latest finished requests (as the exact simulator)."""


def refuse_unmodelled(setup: SimSetup, trace: Sequence[TraceEntry]) -> None:
    """Raise ValueError naming a setting whose effect the fast model leaves out."""
    if setup.engine.prefix_caching and any(e.prefix_id is not None for e in trace):
        raise ValueError("engine.prefix_caching: the fast simulator has no prefix caches, and this trace shares "
                         "prefixes; turn caching off or use the exact simulator")
    if setup.engine.speculative.enabled:
        raise ValueError("engine.speculative: the fast simulator does not model speculative decoding")


class FastSimulation:
    def __init__(self, setup: SimSetup, trace: Sequence[TraceEntry]) -> None:
        refuse_unmodelled(setup, trace)
        self.setup = setup
        self.trace = sorted(trace, key=lambda e: e.arrival_s)
        engine = Engine(setup.engine, realtime=False)
        self.cost_model = engine.cost_model
        self.shape = Shape.of(engine)
        self._kv_bytes_per_block = self.cost_model.kv_bytes_per_token() * setup.engine.block_size
        n = len(self.trace)
        self._prompt = [e.input_tokens for e in self.trace]
        self._output = [e.output_tokens for e in self.trace]
        """Of each request's current attempt: a request handed on resumes with its tokens so far in its prompt."""
        self._dispatched = [math.nan] * n
        self._first = [math.nan] * n
        self._last = [math.nan] * n
        self._decode_of: list[DecodeWorker | None] = [None] * n
        self._order = [0] * n
        """Reservation order on the decode worker (its scheduler's service order)."""
        self._orders = itertools.count()
        self._done: list[int] = []
        """Finished requests, in the order they finished."""
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self.workers: list[Worker] = [self._new_worker(PoolRole.PREFILL) for _ in range(setup.prefill)]
        self.workers += [self._new_worker(PoolRole.DECODE) for _ in range(setup.decode)]
        self._ready_cache: dict[PoolRole, list[Worker]] | None = None
        self._queue: deque[int] = deque()
        self._blocked = False
        """The request at the head of the queue found no room, and none has been freed since."""
        self._retry_s = math.inf
        """When a dispatch retry is due (the router waits for a decode worker to free room)."""
        self._prompt_tokens = 0
        self._decisions: list[Decision] = []
        self._samples: list[PoolSample] = []
        self._arrivals: deque[tuple[float, int]] = deque()
        """(arrival time, prompt tokens) of the requests in the controller's window."""
        self._finish_times: list[float] = []
        self._finished_rows: list[Finished] = []
        self._policy = (load_policy(setup.policy, PolicyContext(setup.controller, self.cost_model),
                                    setup.policy_config) if setup.controller is not None else None)
        self._moving: dict[str, PoolRole] = {}
        self._leaving: set[str] = set()

    # ---- running -------------------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        trace, n = self.trace, len(self.trace)
        if self.setup.controller is not None:
            self._at(self.setup.controller.interval_s, self._tick, None)
        self._sample()
        arrivals = [e.arrival_s for e in trace]
        end = (arrivals[-1] if trace else 0.0) + self.setup.horizon_s
        events, following = self._events, 0
        while len(self._done) < n:
            if following < n and (not events or arrivals[following] <= events[0][0]):
                self.now = arrivals[following]  # arrivals first at a tie, as the exact simulator queues them first
                self._arrive(following)
                following += 1
                continue
            if not events or events[0][0] > end:
                break
            self.now, _, action, argument = heapq.heappop(events)
            action(argument)
        first = arrivals[0] if trace else 0.0
        return SimResult(records(self.trace, self._done, self._dispatched, self._first, self._last),
                         tuple(self._decisions), tuple(self._samples), self.now - first,
                         self._prompt_tokens, 0)

    def _at(self, t: float, action: Callable[[Any], None], argument: Any) -> None:
        heapq.heappush(self._events, (t, next(self._seq), action, argument))

    # ---- the router ------------------------------------------------------------------------------------------
    def _arrive(self, request: int) -> None:
        if self._policy is not None:
            self._arrivals.append((self.now, self._prompt[request]))
        self._queue.append(request)
        self._dispatch()

    def _dispatch(self) -> None:
        """Send queued requests on, oldest first, while a decode worker has room (as the router's `_reserve`). The
        live router tries again after every step of any worker; here only once some room may have been freed."""
        if self._blocked:
            return
        while self._queue:
            request = self._queue[0]
            prefill = self._pick_prefill()
            decode = self._pick_decode(request) if prefill is not None else None
            if decode is None:
                self._blocked = True
                if prefill is not None:
                    self._retry_when_freed()
                return
            self._queue.popleft()
            prompt = self._prompt[request]
            self._dispatched[request] = self.now
            self._decode_of[request] = decode
            prefill.jobs.append([request, prompt, 0])
            prefill.in_flight += prompt
            prefill.queued += prompt
            if not prefill.busy:
                self._prefill_step(prefill)

    def _pick_prefill(self) -> PrefillWorker | None:
        """`policy.pick_prefill` without affinity: fewest tokens in flight, then queued, then requests, then id."""
        return min(self._ready(PoolRole.PREFILL), default=None,
                   key=lambda w: (w.in_flight, w.queued, w.running + w.held, w.worker_id))

    def _pick_decode(self, request: int) -> DecodeWorker | None:
        """`policy.pick_decode` without affinity (most free blocks, then fewest requests, then id), then the
        reservation: None when that worker has no room now, or has preempted requests waiting (they go first)."""
        best, used, requests = None, 0, 0
        for worker in self._ready(PoolRole.DECODE):
            worker_used, worker_requests = worker.load(self.now)
            if best is None or (worker_used, worker_requests, worker.worker_id) < (used, requests, best.worker_id):
                best, used, requests = worker, worker_used, worker_requests
        if best is None:
            return None
        blocks = blocks_for(self._prompt[request], self.shape.block_size)
        if requests >= self.shape.max_num_seqs or self.shape.num_blocks - used < blocks or best.waiting:
            return None
        best.held, best.held_blocks = best.held + 1, best.held_blocks + blocks
        self._order[request] = next(self._orders)
        end = best.cut_at_overflow(self.now)
        if end is not None:
            self._at(end, self._decode_run_end, (best, best.generation))
        return best

    def _retry_when_freed(self) -> None:
        self._retry_at(min((w.free_time(self.now) for w in self._ready(PoolRole.DECODE)), default=math.inf))

    def _retry_at(self, t: float) -> None:
        if t < self._retry_s and math.isfinite(t):
            self._retry_s = t
            self._at(t, self._retry, None)

    def _retry(self, _: None) -> None:
        if self.now >= self._retry_s:
            self._retry_s = math.inf
        self._room_freed()

    def _room_freed(self) -> None:
        """Requests finished, were preempted or released, or the pools changed: the router tries again."""
        self._blocked = False
        self._dispatch()

    def _ready(self, role: PoolRole) -> list[Worker]:
        if self._ready_cache is None:
            self._ready_cache = {r: [w for w in self.workers if w.role is r and w.available and not w.draining]
                                 for r in PoolRole}
        return self._ready_cache[role]

    # ---- the workers -----------------------------------------------------------------------------------------
    def _prefill_step(self, worker: PrefillWorker) -> None:
        done, seconds = worker.schedule()
        if not seconds:
            worker.busy = False
            self._maybe_drained(worker)
            return
        worker.busy = True
        for request in done:
            if self._output[request] > 1:  # a one-token request ends at its first token, holding nothing
                worker.held += 1
                worker.held_blocks += blocks_for(self._prompt[request], self.shape.block_size)
        self._at(self.now + seconds, self._prefilled, (worker, done, seconds))

    def _prefilled(self, step: tuple[PrefillWorker, list[int], float]) -> None:
        worker, done, step_s = step
        for request in done:
            prompt = self._prompt[request]
            worker.in_flight -= prompt
            self._prompt_tokens += prompt
            if math.isnan(self._first[request]):  # not a request handed on, whose first token came before
                self._first[request] = self.now
            self._last[request] = self.now
            if self._output[request] <= 1:  # done at its first token: its reservation is let go
                decode = self._decode_of[request]
                blocks = blocks_for(prompt, self.shape.block_size)
                decode.held, decode.held_blocks = decode.held - 1, decode.held_blocks - blocks
                self._finish(request)
                self._maybe_drained(decode)
                self._blocked = False
                continue
            self._at(self.now + self._handoff_seconds(prompt, step_s), self._handed_off, (worker, request))
        self._prefill_step(worker)
        if self._queue:
            self._dispatch()

    def _handoff_seconds(self, prompt: int, step_s: float) -> float:
        nbytes = blocks_for(prompt, self.shape.block_size) * self._kv_bytes_per_block
        if self.setup.layerwise:
            return self.cost_model.streamed_transfer_seconds(nbytes, self.setup.link, step_s)
        return self.cost_model.transfer_seconds(nbytes, self.setup.link)

    def _handed_off(self, handoff: tuple[PrefillWorker, int]) -> None:
        prefill, request = handoff
        prompt = self._prompt[request]
        prefill.held -= 1
        prefill.held_blocks -= blocks_for(prompt, self.shape.block_size)
        self._maybe_drained(prefill)
        if not prefill.busy and prefill.available:
            self._prefill_step(prefill)
        decode = self._decode_of[request]
        decode.commit(request, prompt, self._output[request] - 1, self._order[request])
        if not decode.busy:
            self._decode_run_end((decode, decode.generation))  # joins at once
            return
        end = decode.cut_short(self.now)
        if end is not None:
            self._at(end, self._decode_run_end, (decode, decode.generation))

    def _decode_run_end(self, run: tuple[DecodeWorker, int]) -> None:
        worker, generation = run
        if generation != worker.generation:
            return  # a handoff cut this run short; a later event ends it
        preemptions = worker.preemptions
        for request in worker.end_run():
            self._last[request] = self.now
            self._finish(request)
            self._blocked = False
        if worker.handing_on:
            worker.handing_on = False
            for request, left in worker.release_all():
                self._continue_elsewhere(request, left)
            self._blocked = False
            if worker.held:  # reserved, its KV still arriving: handed on at the next check
                self._at(self.now + HAND_ON_RECHECK_S, self._hand_on, worker)
        end = worker.start_run(self.now)
        if worker.preemptions != preemptions:
            self._blocked = False
        if end is not None:
            self._at(end, self._decode_run_end, (worker, worker.generation))
            if self._queue:
                self._retry_at(worker.free_time(self.now))
        else:
            self._maybe_drained(worker)
        if self._queue:
            self._dispatch()

    def _hand_on(self, worker: DecodeWorker) -> None:
        """A leaving decode worker still decoding `hand_on_after_s` into its drain hands what it decodes on at its
        next step boundary; a request whose KV is still arriving then follows at the next check."""
        if not worker.draining:
            return
        worker.handing_on = True
        if not worker.busy:
            self._decode_run_end((worker, worker.generation))
            return
        end = worker.cut_short(self.now)
        if end is not None:
            self._at(end, self._decode_run_end, (worker, worker.generation))

    def _continue_elsewhere(self, request: int, left: int) -> None:
        """The router's `migration.continuation`: the tokens so far join the prompt, and the request goes to the
        front of the queue with `left` tokens still to come (the first of them from its prefill)."""
        entry = self.trace[request]
        self._prompt[request] = entry.input_tokens + entry.output_tokens - left
        self._output[request] = left
        self._queue.appendleft(request)

    def _finish(self, request: int) -> None:
        self._done.append(request)
        if self._policy is not None:
            entry, first = self.trace[request], self._first[request]
            output = entry.output_tokens
            tpot = (self.now - first) / (output - 1) if output > 1 else 0.0
            self._finish_times.append(self.now)
            self._finished_rows.append(Finished(entry.input_tokens, output, first - entry.arrival_s, tpot))

    # ---- the controller --------------------------------------------------------------------------------------
    def _tick(self, _: None) -> None:
        config = self.setup.controller
        observation = self._observe()
        decision = within_budget(self._policy.tick(observation), observation, config)
        self._decisions.append(decision)
        for move in decision.moves:
            self._drain(self._worker(move.worker_id))
            self._moving[move.worker_id] = move.to_role
        for worker_id in decision.remove:
            self._drain(self._worker(worker_id))
            self._leaving.add(worker_id)
        for role in decision.add:
            self._start(role)
        self._ready_cache = None
        self._blocked = False
        for worker_id in (*(m.worker_id for m in decision.moves), *decision.remove):
            self._maybe_drained(self._worker(worker_id))
        self._sample()
        if len(self._done) < len(self.trace):
            self._at(self.now + config.interval_s, self._tick, None)

    def _worker(self, worker_id: str) -> Worker:
        return next(w for w in self.workers if w.worker_id == worker_id)

    def _drain(self, worker: Worker) -> None:
        worker.draining = True
        if isinstance(worker, DecodeWorker) and self.setup.hand_on_after_s is not None:
            self._at(self.now + self.setup.hand_on_after_s, self._hand_on, worker)

    def _start(self, role: PoolRole) -> None:
        """An added worker: it holds a machine at once, and serves after `worker_start_s`."""
        worker = self._new_worker(role)
        worker.available = False
        self.workers.append(worker)
        self._at(self.now + self.setup.worker_start_s, self._switched, worker)

    def _maybe_drained(self, worker: Worker) -> None:
        if not worker.draining or worker.busy or worker.has_requests:
            return
        worker.draining, worker.available = False, False
        self._ready_cache = None
        self._blocked = False
        index = self.workers.index(worker)
        if worker.worker_id in self._leaving:
            self._leaving.discard(worker.worker_id)
            del self.workers[index]
            self._sample()
            return
        role = self._moving.pop(worker.worker_id)
        switched = (PrefillWorker if role is PoolRole.PREFILL else DecodeWorker)(worker.worker_id, self.shape)
        switched.available = False
        self.workers[index] = switched
        self._sample()
        self._at(self.now + self.setup.role_switch_s, self._switched, switched)

    def _switched(self, worker: Worker) -> None:
        worker.available = True
        self._ready_cache = None
        self._blocked = False
        self._sample()
        self._room_freed()

    def _observe(self) -> Observation:
        window, now = self.setup.window_s, self.now
        while self._arrivals and self._arrivals[0][0] < now - window:
            self._arrivals.popleft()
        arrived = len(self._arrivals)
        arrived_isl = sum(tokens for _, tokens in self._arrivals) / arrived if arrived else math.nan
        arrived_classes = class_counts(tokens for _, tokens in self._arrivals)
        start = max(len(self._finished_rows) - WINDOW_RECORDS, bisect.bisect_left(self._finish_times, now - window))
        workers = tuple(worker_observation(w, now, self._moving.get(w.worker_id), w.worker_id in self._leaving)
                        for w in self.workers)
        return Observation(now_s=now, workers=workers,
                           traffic=traffic_window(self._finished_rows[start:], arrived / window, window,
                                                  self.setup.slo.ttft_s, self.setup.slo.tpot_s,
                                                  router_waiting=len(self._queue), arrived_input_tokens=arrived_isl,
                                                  arrived_by_class=arrived_classes))

    def _sample(self) -> None:
        counts = {role: sum(1 for w in self.workers if w.role is role and w.available) for role in PoolRole}
        self._samples.append(PoolSample(self.now, counts[PoolRole.PREFILL], counts[PoolRole.DECODE],
                                        len(self.workers)))

    # ---- construction ----------------------------------------------------------------------------------------
    def _new_worker(self, role: PoolRole) -> Worker:
        kind = PrefillWorker if role is PoolRole.PREFILL else DecodeWorker
        return kind(f"w{next(self._ids)}", self.shape)
