"""A discrete-event run of a disaggregated cluster: the real engines, routing policy and controller, a virtual clock.

Used by `pdserve plan`. Nothing here is a model of the scheduler: each worker is a real `Engine` with the `sim`
backend (`realtime=False`), so chunked prefill, continuous batching, block allocation and preemption are the code that
serves live; only time is virtual. A step's duration is the cost model's, a KV handoff's is its bytes over the link,
and the clock jumps from event to event, so an hour of traffic runs in minutes on one core.

The life of a request, as the live router drives it (`router/orchestrator.py`):

    arrival -> router queue -> pick a decode worker (most free blocks) and reserve its blocks (no room: wait)
    -> pick a prefill worker (fewest queued tokens) -> prefilled: first token at the end of that step
    -> KV handoff (bytes / link) -> the prefill worker frees its blocks, the decode worker commits and decodes
    -> finished: its record (TTFT, TPOT, ...) goes to the results and the controller's traffic window.

The controller (when set) ticks every `interval_s` of virtual time on an `Observation` built from the engines and
the finished requests: the policy the live adapter runs (`controller.policy`: the built-in ratio controller, or a
plug-in named in `policy`), kept within the same budget (`policy.refusal`). A MOVE drains the worker (the router
stops sending it work; its requests finish), then it spends `role_switch_s` before it serves in the other role
(live: the drain's idle check, the switch in place or a restart, the routers' refresh and KV pairing). An ADD starts
a worker that holds a machine at once and serves after `worker_start_s`; a REMOVE drains one, which then leaves.
`SimResult.worker_seconds` is the machine time held, what an autoscaled fleet saves. A decode worker
that still decodes `hand_on_after_s` into its drain hands its requests on, as the live one does
(`cluster/worker_pool.py`): each is resumed through the router's migration path, its prompt and tokens so far
prefilled again and decoded elsewhere, under a new attempt id.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pdserve.bench.metrics import RequestRecord
from pdserve.bench.sim_setup import PoolSample, SimResult, SimSetup
from pdserve.bench.sim_views import prompt_affinity, worker_info, worker_observation
from pdserve.bench.workloads import TraceEntry, make_prompt_ids
from pdserve.controller.decision import Decision
from pdserve.controller.observation import Observation, PoolRole
from pdserve.controller.output_lengths import class_counts
from pdserve.controller.policy import PolicyContext, load_policy, within_budget
from pdserve.controller.window import Finished, traffic_window
from pdserve.engine.engine import Engine
from pdserve.engine.request import FinishReason
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sim_runner import PLACEHOLDER_TOKEN
from pdserve.router.policy import Affinity, pick_decode, pick_prefill


@dataclass
class _Worker:
    worker_id: str
    role: PoolRole
    engine: Engine
    busy: bool = False
    draining: bool = False
    available: bool = True
    """False while restarting in a new role."""
    in_flight_tokens: int = 0
    """Prompt tokens the router sent and the worker has not prefilled yet (the policy's fresh view)."""


@dataclass
class _Request:
    request_id: str
    """The attempt's id, as the engines know it (`r<n>`, then `r<n>@retry<k>` once handed on)."""
    entry: TraceEntry
    prompt: tuple[int, ...]
    sampling: SamplingParams
    dispatched: float = math.nan
    prefill: _Worker | None = None
    decode: _Worker | None = None
    first_token: float = math.nan
    last_token: float = math.nan
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    attempts: int = 1
    decoding: bool = False
    queued_tokens: int = 0
    """What its prefill worker is expected to compute (counted in that worker's `in_flight_tokens`)."""
    hashes: tuple[int, ...] | None = None
    """Its prompt's shareable blocks' hashes, once KV-aware routing needed them."""
    """Its KV is on the decode worker and it decodes there (a hand-on can take it)."""

    @property
    def client_id(self) -> str:
        """The id its client knows, whatever attempt it is on."""
        return self.request_id.split("@")[0]


class Simulation:
    def __init__(self, setup: SimSetup, trace: Sequence[TraceEntry], record_itl: bool = False) -> None:
        self.setup = setup
        self.trace = sorted(trace, key=lambda e: e.arrival_s)
        self.record_itl = record_itl
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self.workers: list[_Worker] = [self._new_worker(PoolRole.PREFILL) for _ in range(setup.prefill)]
        self.workers += [self._new_worker(PoolRole.DECODE) for _ in range(setup.decode)]
        self.cost_model = self.workers[0].engine.cost_model
        self._kv_bytes_per_block = self.cost_model.kv_bytes_per_token() * setup.engine.block_size
        self._queue: deque[_Request] = deque()
        self._pending: dict[str, _Request] = {}
        self._records: list[RequestRecord] = []
        self._arrivals: deque[tuple[float, int]] = deque()
        """(arrival time, prompt tokens) of the requests in the controller's window."""
        self._decisions: list[Decision] = []
        self._samples: list[PoolSample] = []
        self._prompt_tokens = self._cached_tokens = 0
        self._kv_aware = (setup.routing == "kv_aware" and setup.engine.prefix_caching
                          and any(e.prefix_id is not None for e in self.trace))
        """Synthetic prompts share tokens only through prefix ids: without any, routing by cache has nothing to
        follow and is skipped (it would hash every prompt for nothing)."""
        self._policy = (load_policy(setup.policy, PolicyContext(setup.controller, self.cost_model),
                                    setup.policy_config) if setup.controller is not None else None)
        self._moving: dict[str, PoolRole] = {}
        """Workers draining to serve the other pool."""
        self._leaving: set[str] = set()
        """Workers draining to stop (removed)."""

    # ---- running -------------------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        for i, entry in enumerate(self.trace):
            self._at(entry.arrival_s, lambda e=entry, n=i: self._arrive(e, n))
        last_arrival = self.trace[-1].arrival_s if self.trace else 0.0
        if self.setup.controller is not None:
            self._at(self.setup.controller.interval_s, self._tick)
        self._sample()
        end = last_arrival + self.setup.horizon_s
        while self._events and len(self._records) < len(self.trace):
            t, _, action = heapq.heappop(self._events)
            if t > end:
                break
            self.now = t
            action()
        self._lose_unfinished()
        first = self.trace[0].arrival_s if self.trace else 0.0
        return SimResult(tuple(self._records), tuple(self._decisions), tuple(self._samples), self.now - first,
                         self._prompt_tokens, self._cached_tokens)

    def _at(self, t: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), action))

    # ---- the router ------------------------------------------------------------------------------------------
    def _arrive(self, entry: TraceEntry, index: int) -> None:
        sampling = SamplingParams(max_tokens=entry.output_tokens, temperature=0.0, ignore_eos=True)
        prompt = make_prompt_ids(0, index, entry, self.workers[0].engine.model_config.vocab_size)
        request = _Request(f"r{index}", entry, prompt, sampling)
        self._arrivals.append((self.now, entry.input_tokens))
        self._queue.append(request)
        self._dispatch()

    def _dispatch(self) -> None:
        """Send queued requests on, oldest first, while a decode worker has room (as the router's `_reserve`)."""
        while self._queue:
            request = self._queue[0]
            prefill = self._pick_prefill(request)
            decode = self._pick_decode(request) if prefill is not None else None  # reserves its blocks
            if decode is None:
                return
            self._queue.popleft()
            request.decode, request.prefill, request.dispatched = decode, prefill, self.now
            affinity = self._affinity(request)
            request.queued_tokens = affinity.uncached_tokens(prefill.worker_id) if affinity else len(request.prompt)
            prefill.in_flight_tokens += request.queued_tokens
            prefill.engine.add_request(request.request_id, request.prompt, request.sampling, prefill_only=True)
            self._pending[request.request_id] = request
            self._wake(prefill)

    def _pick_decode(self, request: _Request) -> _Worker | None:
        ready = self._ready(PoolRole.DECODE)
        if not ready:
            return None
        info = pick_decode([worker_info(w) for w in ready], self._affinity(request))
        worker = next(w for w in ready if w.worker_id == info.worker_id)
        if worker.engine.reserve_remote(request.request_id, request.prompt, request.sampling) is None:
            return None  # the freest worker is full: wait for blocks, as the live router does
        return worker

    def _pick_prefill(self, request: _Request) -> _Worker | None:
        ready = self._ready(PoolRole.PREFILL)
        if not ready:
            return None
        info = pick_prefill([worker_info(w) for w in ready], {w.worker_id: w.in_flight_tokens for w in ready},
                            self._affinity(request))
        return next(w for w in ready if w.worker_id == info.worker_id)

    def _affinity(self, request: _Request) -> Affinity | None:
        """KV-aware routing's view of the prompt: what each engine's prefix cache holds of it."""
        if not self._kv_aware:
            return None
        affinity = prompt_affinity(request.prompt, request.hashes, self.workers, self.setup.engine.block_size,
                                   self.setup.cache_weight)
        request.hashes = affinity.hashes
        return affinity

    def _ready(self, role: PoolRole) -> list[_Worker]:
        return [w for w in self.workers if w.role is role and w.available and not w.draining]

    # ---- the workers -----------------------------------------------------------------------------------------
    def _wake(self, worker: _Worker) -> None:
        if not worker.busy and worker.available:
            worker.busy = True
            self._step(worker)

    def _step(self, worker: _Worker) -> None:
        runner = worker.engine.runner
        before = runner.busy_s
        outputs = worker.engine.step()
        seconds = runner.busy_s - before
        if seconds == 0.0:
            worker.busy = False
            self._maybe_drained(worker)
            return
        self._at(self.now + seconds, lambda: self._stepped(worker, outputs, seconds))

    def _stepped(self, worker: _Worker, outputs, step_s: float) -> None:
        for output in outputs:
            request = self._pending.get(output.request_id)
            if request is None:
                continue
            if worker.role is PoolRole.PREFILL:
                self._prompt_tokens += len(request.prompt)
                self._cached_tokens += output.num_cached_tokens
                self._prefilled(worker, request, output.finish_reason, step_s)
            else:
                self._decoded(request, len(output.new_token_ids), output.finished)
        self._step(worker)
        if self._queue:
            self._dispatch()

    def _prefilled(self, worker: _Worker, request: _Request, reason: FinishReason | None, step_s: float) -> None:
        worker.in_flight_tokens -= request.queued_tokens
        if request.tokens == 0:
            request.first_token = self.now
        elif self.record_itl:
            request.itl.append(self.now - request.last_token)
        request.last_token = self.now
        request.tokens += 1
        if reason is not FinishReason.PREFILLED:  # one output token: done at the first token
            request.decode.engine.abort(request.request_id)
            self._finish(request)
            return
        held = worker.engine.held_block_ids(request.request_id)
        skipped = request.decode.engine.cached_tokens(request.request_id) // self.setup.engine.block_size
        blocks = len(held) - skipped  # the decode worker's cached prefix is not sent
        nbytes = blocks * self._kv_bytes_per_block
        if self.setup.layerwise:
            seconds = self.cost_model.streamed_transfer_seconds(nbytes, self.setup.link, step_s)
        else:
            seconds = self.cost_model.transfer_seconds(nbytes, self.setup.link)
        self._at(self.now + seconds, lambda: self._handed_off(request))

    def _handed_off(self, request: _Request) -> None:
        request.prefill.engine.release(request.request_id)
        self._maybe_drained(request.prefill)
        self._wake(request.prefill)
        output = request.decode.engine.commit_remote(request.request_id, PLACEHOLDER_TOKEN)
        request.decoding = True
        if output.finished:
            self._finish(request)
        self._wake(request.decode)

    def _decoded(self, request: _Request, count: int, finished: bool) -> None:
        if self.record_itl:
            request.itl.append(self.now - request.last_token)
        request.tokens += count
        request.last_token = self.now
        if finished:
            self._finish(request)

    def _finish(self, request: _Request) -> None:
        del self._pending[request.request_id]
        e = request.entry
        tpot = (request.last_token - request.first_token) / (request.tokens - 1) if request.tokens > 1 else 0.0
        self._records.append(RequestRecord(
            request_id=request.client_id, arrival_s=e.arrival_s, input_tokens=e.input_tokens,
            output_tokens=request.tokens, queue_s=request.dispatched - e.arrival_s,
            ttft_s=request.first_token - e.arrival_s, tpot_s=tpot, e2e_s=request.last_token - e.arrival_s,
            itl_s=tuple(request.itl), ok=True, error=""))
        self._maybe_drained(request.decode)

    def _lose_unfinished(self) -> None:
        lost = list(self._pending.values()) + list(self._queue)
        for request in lost:
            e = request.entry
            self._records.append(RequestRecord(
                request_id=request.request_id, arrival_s=e.arrival_s, input_tokens=e.input_tokens,
                output_tokens=request.tokens, queue_s=math.nan, ttft_s=math.nan, tpot_s=math.nan, e2e_s=math.nan,
                itl_s=(), ok=False, error="unfinished at the horizon"))

    # ---- the controller --------------------------------------------------------------------------------------
    def _tick(self) -> None:
        config = self.setup.controller
        observation = self._observe(config.interval_s)
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
        for worker_id in (*(m.worker_id for m in decision.moves), *decision.remove):
            self._maybe_drained(self._worker(worker_id))
        self._sample()
        if self._records_left():
            self._at(self.now + config.interval_s, self._tick)

    def _worker(self, worker_id: str) -> _Worker:
        return next(w for w in self.workers if w.worker_id == worker_id)

    def _drain(self, worker: _Worker) -> None:
        worker.draining = True
        if worker.role is PoolRole.DECODE and self.setup.hand_on_after_s is not None:
            self._at(self.now + self.setup.hand_on_after_s, lambda: self._hand_on(worker))

    def _start(self, role: PoolRole) -> None:
        """An added worker: it holds a machine at once, and serves after `worker_start_s`."""
        worker = self._new_worker(role)
        worker.available = False
        self.workers.append(worker)
        self._at(self.now + self.setup.worker_start_s, lambda: self._switched(worker))

    def _records_left(self) -> bool:
        return len(self._records) < len(self.trace)

    def _maybe_drained(self, worker: _Worker) -> None:
        if not worker.draining or worker.busy or worker.engine.num_requests or worker.in_flight_tokens:
            return
        worker.draining, worker.available = False, False
        if worker.worker_id in self._leaving:
            self._leaving.discard(worker.worker_id)
            self.workers.remove(worker)
            self._sample()
            return
        worker.role = self._moving.pop(worker.worker_id)
        self._sample()
        self._at(self.now + self.setup.role_switch_s, lambda: self._switched(worker))

    def _hand_on(self, worker: _Worker) -> None:
        """Resume elsewhere what a leaving decode worker still decodes; those whose KV is still arriving follow at
        the next check, a second later."""
        if not worker.draining:
            return
        for request in [r for r in self._pending.values() if r.decode is worker and r.decoding]:
            worker.engine.abort(request.request_id)
            del self._pending[request.request_id]
            self._queue.appendleft(self._continuation(request))
        if worker.engine.num_requests:
            self._at(self.now + 1.0, lambda: self._hand_on(worker))
        self._maybe_drained(worker)
        self._dispatch()

    @staticmethod
    def _continuation(request: _Request) -> _Request:
        """The router's `migration.continuation`: the tokens so far join the prompt, max_tokens shrinks by them."""
        request.request_id = f"{request.client_id}@retry{request.attempts}"
        request.attempts += 1
        request.prompt = request.prompt[:request.entry.input_tokens] + (PLACEHOLDER_TOKEN,) * request.tokens
        request.hashes = None
        request.sampling = SamplingParams(max_tokens=request.entry.output_tokens - request.tokens, temperature=0.0,
                                          ignore_eos=True)
        request.prefill = request.decode = None
        request.decoding = False
        return request

    def _switched(self, worker: _Worker) -> None:
        worker.available = True
        self._sample()
        self._dispatch()

    def _observe(self, interval_s: float) -> Observation:
        window = self.setup.window_s
        while self._arrivals and self._arrivals[0][0] < self.now - window:
            self._arrivals.popleft()
        arrived = len(self._arrivals)
        arrived_isl = sum(tokens for _, tokens in self._arrivals) / arrived if arrived else math.nan
        arrived_classes = class_counts(tokens for _, tokens in self._arrivals)
        recent = [Finished(r.input_tokens, r.output_tokens, r.ttft_s, r.tpot_s) for r in self._records[-5000:]
                  if r.ok and r.arrival_s + r.e2e_s >= self.now - window]
        workers = tuple(worker_observation(w, self._moving.get(w.worker_id), w.worker_id in self._leaving)
                        for w in self.workers)
        return Observation(now_s=self.now, workers=workers,
                           traffic=traffic_window(recent, arrived / window, window, self.setup.slo.ttft_s,
                                                  self.setup.slo.tpot_s, router_waiting=len(self._queue),
                                                  arrived_input_tokens=arrived_isl,
                                                  arrived_by_class=arrived_classes))

    def _sample(self) -> None:
        counts = {role: sum(1 for w in self.workers if w.role is role and w.available) for role in PoolRole}
        self._samples.append(PoolSample(self.now, counts[PoolRole.PREFILL], counts[PoolRole.DECODE],
                                        len(self.workers)))

    # ---- construction ----------------------------------------------------------------------------------------
    def _new_worker(self, role: PoolRole) -> _Worker:
        return _Worker(f"w{next(self._ids)}", role, Engine(self.setup.engine, realtime=False))

