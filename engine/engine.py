"""The engine: requests in, tokens out, one step at a time. Shared by the prefill and decode workers.

A step is `schedule -> run -> postprocess`: the scheduler picks chunks, the model runner computes them and samples,
and postprocessing appends tokens, detokenizes, checks stop conditions and frees finished requests' blocks.

Disaggregation hooks (used by the prefill and decode workers):
- prefill side: `add_request(..., prefill_only=True)`; its step output ends with `FinishReason.PREFILLED` and the
  request keeps its blocks (`held_block_ids`) until `release`.
- decode side: `reserve_remote` allocates blocks for a prompt whose KV is written from elsewhere into `kv_cache`;
  `commit_remote` with the first token makes it decode like any other request.

Prefix caching (`engine.prefix_caching`, see the scheduler and block manager) applies on both sides: a prefill
starts at its first uncached token, and a reservation shares the cached blocks of its prompt's prefix, so only the
blocks after them need to be sent.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from pdserve.engine.block_manager import BlockManager, CacheEvents, blocks_for
from pdserve.engine.config import ConfigError, EngineConfig, ModelConfig
from pdserve.engine.detokenizer import Detokenizer, Finish
from pdserve.engine.engine_load import EngineLoad
from pdserve.engine.engine_parts import build_parts
from pdserve.engine.grammar_state import Grammars, GrammarState
from pdserve.engine.layer_progress import LayerProgress
from pdserve.engine.logprobs import Sampled, TokenLogprobs
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.model_source import context_length, read_model_config, resolve_engine_model
from pdserve.engine.request import ONLINE_PRIORITY, FinishReason, Prompt, Request, RequestOutput, RequestStatus
from pdserve.engine.sampling_params import SamplingError, SamplingParams
from pdserve.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from pdserve.engine.tokenizer import tokenize_prompt
from pdserve.engine.verified import may_speculate, verified_tokens

log = logging.getLogger(__name__)

class RequestError(ValueError):
    """A request cannot be served as given; the message names the field."""


RETUNABLE = ("max_num_batched_tokens", "max_num_seqs")
"""What a running engine can change (`Engine.retune`)."""


def retunable(built: EngineConfig, wanted: EngineConfig) -> bool:
    """Whether an engine built with `built` can serve as `wanted` by `retune`."""
    return all(getattr(built, f.name) == getattr(wanted, f.name) for f in dataclasses.fields(EngineConfig)
               if f.name not in RETUNABLE)


class Engine:
    def __init__(self, config: EngineConfig, realtime: bool = True) -> None:
        """`realtime` matters only to a sim engine: False returns from each step at once (the offline planner)."""
        self.config = config
        source = resolve_engine_model(config)
        self.model_config: ModelConfig = read_model_config(source)
        self.max_model_len = context_length(config, self.model_config)
        parts = build_parts(config, source, self.model_config, self.max_model_len, realtime)
        self.model = parts.model
        self.tokenizer = parts.tokenizer
        self.fingerprint = parts.fingerprint
        self.kv_cache = parts.kv_cache
        self.runner = parts.runner
        self.cost_model = parts.cost_model
        self.blocks = BlockManager(self.kv_cache.num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_batched_tokens, config.max_num_seqs,
                                   config.speculative)
        self.eos_token_ids = self._eos_ids()
        self.grammars = Grammars(self.tokenizer.hf, self.model_config.vocab_size) if self.tokenizer else None
        """Structured output's masks (a model with a tokenizer only)."""
        if isinstance(self.runner, ModelRunner):
            self.runner.sampler.eos_token_ids = self.eos_token_ids
            self.runner.sampler.grammars = self.grammars
        self._requests: dict[str, Request] = {}
        self._detokenizers: dict[str, Detokenizer] = {}
        self._order = itertools.count()
        self.last_schedule: SchedulerOutput | None = None
        """The latest step's schedule (which chunks ran), for the worker's metrics."""
        self.preemptions_total = 0
        """Requests preempted (blocks freed, recomputed later) since the engine started."""
        self.prompt_tokens_total = 0
        """Prompt tokens of requests that got their first token here (computed, received or cached)."""
        self.cached_tokens_total = 0
        """Of those, tokens whose KV came from the prefix cache."""
        self.on_final_chunk: Callable[[str, tuple[int, ...]], LayerProgress | None] | None = None
        """Layer-wise KV streaming: called with (request id, its block ids) when a prefill-only request's last prompt
        chunk is scheduled, before the step runs; the LayerProgress it returns is told as each layer is done."""
        self.speculative_steps_total = 0
        self.speculative_proposed_total = 0
        self.speculative_accepted_total = 0
        """Speculative decoding: steps that checked proposals, tokens proposed, and of those the ones accepted."""
        log.info("engine ready: %s (%s), %d layers, %d KV blocks of %d tokens, max_model_len %d", config.model,
                 config.backend, self.model_config.num_layers, self.kv_cache.num_blocks, config.block_size,
                 self.max_model_len)

    # ---- requests --------------------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        return tokenize_prompt(prompt, self.tokenizer, self.model_config.vocab_size)

    def add_request(self, request_id: str, prompt: Prompt | Sequence[int], sampling: SamplingParams,
                    prefill_only: bool = False, resumed_tokens: int = 0, priority: int = ONLINE_PRIORITY) -> list[int]:
        """Queue a request; returns its prompt token ids. Raises RequestError/PromptError on bad input.

        `resumed_tokens`: the prompt's last tokens are output a client already has (the request resumes after its
        worker failed): the output text, stop strings and seeded sampling go on from them as if uninterrupted,
        while `max_tokens` counts only the tokens still to come. `priority`: lower is served first and preempted
        last (`engine.scheduler`)."""
        token_ids = self.tokenize(prompt if isinstance(prompt, Prompt) else Prompt(token_ids=tuple(prompt)))
        request = self._new_request(request_id, token_ids, sampling, prefill_only, resumed_tokens, priority=priority)
        self.scheduler.add(request)
        return token_ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks. None if it is unknown or already done."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        return self._finish(request, Finish(FinishReason.ABORT), (), "")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def computed_tokens(self, request_id: str) -> int | None:
        """Tokens of a request whose KV is computed (0 while it waits); None if the engine does not know it."""
        request = self._requests.get(request_id)
        return None if request is None else request.num_computed_tokens

    def cached_tokens(self, request_id: str) -> int:
        """Prompt tokens of a request whose KV came from the prefix cache (0 if the engine does not know it)."""
        request = self._requests.get(request_id)
        return 0 if request is None else request.num_cached_tokens

    def take_cache_events(self) -> CacheEvents:
        """Block hashes cached and evicted since the last call (for KV-aware routing)."""
        return self.blocks.take_events()

    def load(self) -> EngineLoad:
        """How busy the engine is, for routing and the registry."""
        s = self.scheduler
        queued = sum(r.num_uncomputed for r in s.waiting) + sum(r.num_uncomputed for r in s.running
                                                                 if not r.is_decoding)
        return EngineLoad(running=len(s.running), waiting=len(s.waiting), held=len(s.held),
                          queued_prefill_tokens=queued, kv_blocks_used=self.blocks.num_used,
                          kv_blocks_total=self.blocks.num_blocks, prompt_tokens_total=self.prompt_tokens_total,
                          cached_tokens_total=self.cached_tokens_total,
                          speculative_steps_total=self.speculative_steps_total,
                          speculative_proposed_total=self.speculative_proposed_total,
                          speculative_accepted_total=self.speculative_accepted_total)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    @property
    def request_ids(self) -> tuple[str, ...]:
        """Every request here: waiting, running, or held."""
        return tuple(self._requests)

    # ---- the step --------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.last_schedule = out
        self.preemptions_total += len(out.preempted)
        if not out.chunks:
            return []
        started = time.perf_counter()
        streams = self._layer_streams(out.chunks)
        try:
            result = self.runner.run(out.chunks, streams)
        except BaseException:
            for progress in streams:
                progress.abandon()
            raise
        sampled = result.sampled
        outputs = []
        for chunk in out.chunks:
            request = self._requests[chunk.request_id]
            if chunk.request_id in result.prompt_logprobs:  # by position: a recomputed chunk writes the same again
                found = result.prompt_logprobs[chunk.request_id]
                request.prompt_logprobs[chunk.start_pos + 1:chunk.start_pos + 1 + len(found)] = found
            if chunk.speculates:
                outputs += self._append_verified(chunk, request, sampled[chunk.request_id])
                continue
            self.scheduler.advance(chunk, request)
            if chunk.request_id in sampled:
                picked = sampled[chunk.request_id]
                outputs.append(self._append_token(request, picked.token_id, picked.logprobs))
        self._report_decode_step(out.chunks, time.perf_counter() - started, len(outputs))
        return outputs

    def _layer_streams(self, chunks: Sequence[ScheduledChunk]) -> list[LayerProgress]:
        """What `on_final_chunk` returns for each prefill-only request whose last prompt chunk runs in this step."""
        if self.on_final_chunk is None:
            return []
        found = [self.on_final_chunk(c.request_id, c.block_ids) for c in chunks
                 if c.sample and c.output_index == 0 and self._requests[c.request_id].prefill_only]
        return [progress for progress in found if progress is not None]

    def _report_decode_step(self, chunks: Sequence[ScheduledChunk], seconds: float, tokens: int) -> None:
        """Tell the speculation governor what a step that only decoded cost per token."""
        governor = self.scheduler.governor
        if governor is not None and all(c.speculates or (len(c.token_ids) == 1 and c.output_index) for c in chunks):
            governor.observe(len(chunks), any(c.speculates for c in chunks), seconds, tokens)

    def generate(self, prompts: Iterable[Prompt | Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams],
                 ) -> list[RequestOutput]:
        """Run a batch to completion (all submitted at once); final outputs in input order."""
        prompts = list(prompts)
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        ids = [f"generate-{next(self._order)}" for _ in prompts]
        try:
            for request_id, prompt, p in zip(ids, prompts, params):
                self.add_request(request_id, prompt, p)
        except ValueError:
            for request_id in ids:
                self.abort(request_id)
            raise
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for output in self.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[i] for i in ids]

    def retune(self, config: EngineConfig) -> None:
        """Take another pool's scheduler limits: a worker that switches roles in place keeps its weights and KV
        cache, so only `RETUNABLE` fields may differ from the config this engine was built with."""
        if not retunable(self.config, config):
            raise ConfigError(f"engine: only {', '.join(RETUNABLE)} change in place; the rest differs")
        self.config = config
        self.scheduler.max_num_batched_tokens = config.max_num_batched_tokens
        self.scheduler.max_num_seqs = config.max_num_seqs

    # ---- disaggregation hooks --------------------------------------------------------------------------------
    def held_block_ids(self, request_id: str) -> tuple[int, ...]:
        """Blocks of a held request (prefilled here, or reserved for a remote prefill)."""
        return tuple(self._held(request_id).block_ids)

    def release(self, request_id: str) -> None:
        """Free a held request's blocks (its KV was sent, or the handoff failed)."""
        request = self._held(request_id)
        self.scheduler.finish(request)
        self._forget(request)

    def reserve_remote(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams,
                       resumed_tokens: int = 0, priority: int = ONLINE_PRIORITY) -> tuple[int, ...] | None:
        """Allocate blocks for a prompt prefilled elsewhere (preempting running requests of lower priority if
        needed); None when too few blocks are free right now. The first `cached_tokens(request_id) // block_size`
        blocks hold a cached prefix already: only the rest need KV. `resumed_tokens`, `priority` as for
        `add_request`."""
        request = self._new_request(request_id, list(prompt_token_ids), sampling, False, resumed_tokens,
                                    computes_prompt=False, priority=priority)
        if not self.scheduler.reserve(request):
            self._forget(request)
            return None
        return tuple(request.block_ids)

    def commit_remote(self, request_id: str, first_token_id: int) -> RequestOutput:
        """The KV of a reserved request is in place: take its first token (sampled by the prefill worker).

        The returned output's text_delta is the first token's text, which the prefill side already reported."""
        request = self._held(request_id)
        request.num_computed_tokens = len(request.prompt_token_ids)
        request.num_preemptions = 0
        output = self._append_token(request, first_token_id)
        if not output.finished:
            self.scheduler.commit(request)
        return output

    # ---- internals -------------------------------------------------------------------------------------------
    def _new_request(self, request_id: str, token_ids: list[int], sampling: SamplingParams, prefill_only: bool,
                     resumed_tokens: int = 0, computes_prompt: bool = True, priority: int = ONLINE_PRIORITY) -> Request:
        """`computes_prompt`: False for a prompt prefilled elsewhere (its prompt logprobs come from there)."""
        if not isinstance(sampling, SamplingParams):
            raise SamplingError("sampling: expected SamplingParams")
        if request_id in self._requests:
            raise RequestError(f"request_id: {request_id!r} is already in use")
        total = len(token_ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise RequestError(f"max_tokens: prompt ({len(token_ids)} tokens) + max_tokens ({sampling.max_tokens}) "
                               f"= {total} exceeds the context length {self.max_model_len}")
        if blocks_for(total, self.config.block_size) > self.blocks.num_blocks:
            raise RequestError(f"max_tokens: prompt + max_tokens = {total} tokens needs more KV blocks than the "
                               f"cache has ({self.blocks.num_blocks} of {self.config.block_size} tokens)")
        outside = [t for t in (*(t for t, _ in sampling.logit_bias), *sampling.allowed_token_ids)
                   if t >= self.model_config.vocab_size]
        if outside:
            raise RequestError(f"logit_bias / allowed_token_ids: token ids {outside[:5]} are out of vocabulary "
                               f"[0, {self.model_config.vocab_size})")
        if not 0 <= resumed_tokens < len(token_ids):
            raise RequestError(f"resumed_tokens: {resumed_tokens} must be at least 0 and below the prompt's "
                               f"{len(token_ids)} tokens")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise RequestError(f"priority: must be an integer, got {priority!r}")
        request = Request(request_id, tuple(token_ids), sampling, next(self._order), prefill_only,
                          priority=priority, resumed_tokens=resumed_tokens,
                          speculative=may_speculate(self.config, sampling, prefill_only))
        if sampling.prompt_logprobs is not None and computes_prompt:
            request.prompt_logprobs = [None] * len(token_ids)
        if sampling.structured_output is not None:
            request.grammar = self._start_grammar(sampling, token_ids[len(token_ids) - resumed_tokens:])
        detokenizer = Detokenizer(self.tokenizer, sampling, self.eos_token_ids)
        if resumed_tokens:
            detokenizer.replay(token_ids[len(token_ids) - resumed_tokens:])
        self._requests[request_id] = request
        self._detokenizers[request_id] = detokenizer
        return request

    def _append_token(self, request: Request, token_id: int, logprobs: TokenLogprobs | None = None) -> RequestOutput:
        detok = self._detokenizers[request.request_id]
        delta, finish = detok.add(token_id)
        if not request.output_token_ids:
            self.prompt_tokens_total += len(request.prompt_token_ids)
            self.cached_tokens_total += request.num_cached_tokens
        request.output_token_ids.append(token_id)  # stop tokens too, as transformers and vLLM report them
        if finish is None and (len(request.output_token_ids) >= request.sampling.max_tokens
                               or request.num_tokens >= self.max_model_len):
            finish = Finish(FinishReason.LENGTH)
            delta += detok.flush()
        if request.grammar is not None and finish is None:
            finish = self._follow_grammar(request, token_id)
            delta += detok.flush() if finish is not None else ""
        picked = (logprobs,) if logprobs is not None else ()
        if finish is not None:
            return self._finish(request, finish, (token_id,), delta, picked)
        if request.prefill_only:
            self.scheduler.hold(request)
            return self._output(request, (token_id,), delta, Finish(FinishReason.PREFILLED), picked)
        return self._output(request, (token_id,), delta, None, picked)

    def _append_verified(self, chunk: ScheduledChunk, request: Request, picked: Sampled) -> list[RequestOutput]:
        """A speculative chunk's tokens, one output each until one ends the request; then the request's KV covers
        its last token and the accepted proposals (`engine.verified`)."""
        emitted, proposed = verified_tokens(chunk, request, picked, self.kv_cache)
        self.speculative_steps_total += 1
        self.speculative_proposed_total += proposed
        self.speculative_accepted_total += len(emitted) - 1
        outputs = []
        for token in emitted:
            outputs.append(self._append_token(request, token))
            if outputs[-1].finished:
                break
        else:
            self.scheduler.advance(chunk, request, computed=chunk.start_pos + len(emitted))
        outputs[0] = dataclasses.replace(outputs[0], speculative_proposed=proposed,
                                         speculative_accepted=len(emitted) - 1)
        return outputs

    def _start_grammar(self, sampling: SamplingParams, resumed: Sequence[int]) -> GrammarState:
        structured = sampling.structured_output
        if self.grammars is None:
            raise RequestError(f"{structured.field}: this model has no tokenizer, so no structured output")
        try:
            return self.grammars.start(structured, resumed)
        except ValueError as e:
            raise RequestError(str(e)) from e

    def _follow_grammar(self, request: Request, token_id: int) -> Finish | None:
        """Advance the request's grammar by its new token: STOP once the grammar is complete."""
        if not request.grammar.accept(token_id):  # the mask allowed it, so this is a bug: end, keep the worker
            log.error("request %s: token %d breaks its structured output (%s); stopping it", request.request_id,
                      token_id, request.grammar.error)
            return Finish(FinishReason.STOP)
        return Finish(FinishReason.STOP) if request.grammar.complete else None

    def _finish(self, request: Request, finish: Finish, new: tuple[int, ...], delta: str,
                logprobs: tuple[TokenLogprobs, ...] = ()) -> RequestOutput:
        self.scheduler.finish(request)
        output = self._output(request, new, delta, finish, logprobs)
        self._forget(request)
        return output

    def _output(self, request: Request, new: tuple[int, ...], delta: str, finish: Finish | None,
                logprobs: tuple[TokenLogprobs, ...] = ()) -> RequestOutput:
        detok = self._detokenizers[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=tuple(request.prompt_token_ids),
            token_ids=tuple(request.output_token_ids),
            new_token_ids=new,
            text=detok.text,
            text_delta=delta,
            finish_reason=None if finish is None else finish.reason,
            stop_reason=None if finish is None else finish.stop_reason,
            num_cached_tokens=request.num_cached_tokens,
            logprobs=logprobs,
            prompt_logprobs=tuple(request.prompt_logprobs) if request.prompt_logprobs is not None
            and len(request.output_token_ids) == 1 else None,
        )

    def _forget(self, request: Request) -> None:
        self._requests.pop(request.request_id, None)
        self._detokenizers.pop(request.request_id, None)

    def _held(self, request_id: str) -> Request:
        request = self._requests.get(request_id)
        if request is None or request.status is not RequestStatus.HELD:
            raise RequestError(f"request_id: {request_id!r} is not held by this engine")
        return request

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))
