"""How many workers each pool needs for the observed traffic, and how the model is corrected by what was observed.

Notation: lambda = arrival rate (req/s), ISL/OSL = mean input/output tokens of the window's arrivals (the prompt's
known on arrival, the output's predicted from the prompt's length class: `output_lengths`), falling back to those
of the window's finished requests,
P/D = active prefill/decode workers now, T = slo_ttft_s, tau = slo_tpot_s, c_ttft/c_tpot = the corrections.

Prefill (see `perf_model` for u_p):

    S               = prefill_seconds(ISL) * c_ttft                 corrected service time of one prompt
    demand_p        = lambda * S                                     worker-seconds of prefill per second
    need_p_steady   = demand_p / u_p                                 workers to keep TTFT (mean) under T
    backlog_tokens  = sum(queued_prefill_tokens)                     (the router's queue waits for decode, not prefill)
    backlog_work    = backlog_tokens / ISL * S                       worker-seconds already queued
    need_p_backlog  = demand_p + backlog_work / T                     serve arrivals and clear the queue within T
    clear_s         = backlog_work / (P - demand_p)                  how long the pool as it is takes to clear it
                                                                     (for the budget: `trend.budget_needs`)
    need_p          = max(need_p_steady, need_p_backlog) * pressure_ttft

Decode (see `perf_model` for B* and throughput; the first token comes from prefill):

    ctx             = ISL + OSL / 2                                  mean context over a request's decode
    batch_cap       = min(max_num_seqs, KV_HIGH_WATER * kv_capacity_tokens / ctx)
    demand_d        = lambda * (OSL - 1)                             tokens per second
    need_d_steady   = demand_d / (throughput(B*) * DECODE_UTILISATION)
    need_d_queue    = held / (B*_held * DECODE_UTILISATION)
                      held = sum(running + waiting) + router_waiting (the router holds a request until a decode
                      worker has reserved room for it);
                      B*_held = B* at the held requests' own mean context (their KV tokens / held) when the KV
                      use is known, else B*
    need_d_kv       = D * kv_used_fraction / KV_HIGH_WATER                (> D only above the high water;
                      0 unless a decode worker has requests waiting: a full cache that admits every arrival is
                      the plan working, not a shortage)
    need_d          = max(need_d_steady, need_d_queue, need_d_kv) * pressure_tpot

What the averages hide: the backlog, queue and KV terms read the workers' heartbeats, so a burst raises the need
while it lasts. The pressure terms read the tail: when the observed p90 is above its SLO and the pool is busy
(need >= PRESSURE_MIN_LOAD * size), pressure = min(p90 / SLO, MAX_PRESSURE); otherwise 1, and 1 within a window of
the last move (the window's tail is then the old split's).

`need_p_steady` and `need_d_steady` (the averages alone) are kept apart as well: when no split has room, the queues
are everywhere and the controller splits by these (see `controller`).

Corrections (the model is a profile; the hardware, the KV handoff and the router add their own time). Each is the
factor on the model's time that makes the predicted p50 match the observed one:

    predicted TTFT p50 = mean over the window's ticks of  S + W(min(lambda * S / P_tick, 0.95))
                         S = prefill_seconds(ISL) * c_ttft (as above), P_tick = the prefill pool at that tick
    predicted TPOT p50 = decode_step_seconds(b, ctx) * c_tpot        b = mean running per decode worker
    c <- clamp((1 - alpha) * c + alpha * clamp(c * observed / predicted))   clamps: CORRECTION_RANGE

For TPOT, c * observed / predicted is simply observed / model; for TTFT the queueing term makes the prediction grow
faster than c, and iterating to the fixed point (predicted == observed) keeps that growth from being read as a slower
prefill (a plain observed/uncorrected ratio would be, and would oversize the pool).

Both learn only from windows with at least CORRECTION_MIN_FINISHED finished requests, and only from windows whose
requests the prediction describes:
- TTFT is predicted for the prefill pools the window's requests ran under (the pool sampled at each tick of the
  window). It waits a window after a move or an add: moves and adds come with shifts in the mix and with queues,
  whose TTFTs the M/D/1 term does not describe (learning there cost the scenario family up to 0.13 of goodput at
  phase changes); a window whose only changes were removes, made because the load fell, it learns from, since its
  requests ran under pools it knows (until 2026-12-06 it waited there too, and live an afternoon of removes a drain
  apart left it for minutes at a value learned in the peak's queues: the afternoon's prefill need read twice the
  morning's at the same rate). It also waits two windows after the prefill queue was last long (queued work per
  prefill worker > T): the TTFTs of a backlog that has just cleared would be read as a slower model and oversize
  the pool for minutes (seen in `pdserve plan` at phase changes); a queue that is long now is the backlog term's job.
- TPOT waits a window after a move or a worker in transition: the TPOTs of a batch that a move has just halved
  are the old split's, and the batch per worker is read from the pool as it is now.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pdserve.controller.config import ControllerConfig, ControllerState
from pdserve.controller.observation import Observation, PoolRole
from pdserve.controller.output_lengths import expected_output, learn
from pdserve.controller.perf_model import PerfModel, decode_capacity, md1_wait, prefill_max_utilisation

PREDICTION_RHO_CAP = 0.95
"""Utilisation at which the predicted TTFT's queueing term stops growing (it is infinite at 1)."""

# The model's own constants. They were settings until the scenario family (BENCHMARKS.md, "The controller on a family
# of scenarios") showed no reason to tune them per deployment; each keeps the value it had, for the reason given.
PREFILL_UTILISATION_FLOOR = 0.5
"""Lowest planned prefill utilisation, used when the prompt alone nearly takes the whole TTFT SLO (the M/D/1 formula
would then ask for a nearly idle pool, which no number of workers fixes: batching prompts does)."""
PREFILL_UTILISATION_CAP = 0.9
"""Highest planned prefill utilisation, however loose the TTFT SLO: a pool planned at 100% has no room for a burst."""
DECODE_UTILISATION = 0.9
"""Share of B* a decode worker is planned to carry on average, for the same reason."""
KV_HIGH_WATER = 0.9
"""Share of a decode worker's KV cache the plan fills; above it, KV use itself raises the decode need (the engine
preempts when the cache is full, and a full cache admits no new request)."""
MAX_PRESSURE = 1.5
"""The most an observed p90 above its SLO multiplies a pool's need by: the tail says the pool is short, not by how
much, and a larger factor moved more workers than a burst needed."""
PRESSURE_MIN_LOAD = 0.7
"""An observed p90 above its SLO raises a pool's need only if the pool's predicted load is at least this: a lightly
loaded pool's tail comes from its prompts' own length, not from too few workers."""
CORRECTION_RANGE = (0.5, 4.0)
"""Clamps of the observed/predicted corrections: the roofline model is within 2x of every measured engine, and a
correction outside that says the window was unusual (a backlog clearing), not that the model is wrong."""
CORRECTION_ALPHA = 0.3
"""EMA weight of the newest observed/predicted ratio: a window is 30 s, so the corrections follow a real change in
about a minute and a half and ride out one odd window."""
CORRECTION_MIN_FINISHED = 10
"""The corrections learn only from windows with at least this many finished requests (a p50 of fewer is noise)."""


@dataclass(frozen=True)
class PoolNeeds:
    """Workers each pool needs (fractional), with every number that went into them."""

    prefill: float
    decode: float
    prefill_steady: float
    """The prefill need from the averages alone (no queue or pressure term)."""
    decode_steady: float
    inputs: dict[str, float]
    notes: tuple[str, ...] = ()
    """Warnings for the reason sentence, e.g. an SLO no split can meet."""


def _lengths(obs: Observation) -> tuple[int, int, int]:
    """(ISL, OSL, ctx) as whole tokens."""
    isl = max(1, round(obs.traffic.mean_input_tokens))
    osl = max(1, round(obs.traffic.mean_output_tokens))
    return isl, osl, max(1, round(isl + osl / 2))


def _demand_lengths(obs: Observation, state: ControllerState) -> tuple[int, int, int]:
    """(ISL, OSL, ctx) for sizing the pools: the lengths of what is arriving when known (both follow a change in the
    mix at once: the prompt's is known on arrival, the output's is predicted from the prompt's length class), else
    of what finished. With neither known for the output (nothing has finished yet) OSL is 1: no steady decode need,
    only the requests decode holds (`estimate_early_needs`)."""
    traffic = obs.traffic
    isl, osl = traffic.mean_input_tokens, traffic.mean_output_tokens
    if math.isfinite(traffic.arrived_input_tokens) and traffic.arrived_input_tokens >= 1:
        isl = traffic.arrived_input_tokens
    predicted = expected_output(state.output_by_class, traffic.arrived_by_class)
    if math.isfinite(predicted) and predicted >= 1:
        osl = predicted
    isl = max(1, round(isl))
    osl = max(1, round(osl)) if math.isfinite(osl) else 1
    return isl, osl, max(1, round(isl + osl / 2))


def _backlog_tokens(obs: Observation) -> int:
    """Prompt tokens waiting for prefill: the prefill workers' queues. The router's queue is not prefill's: the
    router sends a request on only once a decode worker has reserved room for it (and a prefill worker always takes
    it), so what the router holds waits for decode. Counted as prompts waiting for prefill it sent more workers to
    prefill, which starved decode further: first only while every decode worker was at its limit (the scenario
    family: 12:2 -> 13:1 on a chat phase), then whenever one of them had a few slots left (a daily day on 8B: after a
    burst the fleet went 8:4 where 4:7 was enough, and its attainment stayed at 0 for a quarter of an hour)."""
    return sum(w.queued_prefill_tokens for w in obs.workers if w.role is PoolRole.PREFILL)


def _settled(state: ControllerState, obs: Observation) -> bool:
    """No move within the traffic window: its requests ran under the split as it is now."""
    return obs.now_s - state.last_move_s >= obs.traffic.window_s


def _ema(config: ControllerConfig, old: float, ratio: float) -> float:
    low, high = CORRECTION_RANGE
    ratio = min(max(ratio, low), high)
    new = (1 - CORRECTION_ALPHA) * old + CORRECTION_ALPHA * ratio
    return min(max(new, low), high)


def _predicted_ttft(model: PerfModel, isl: int, correction: float, rate: float, size: int) -> float:
    """The M/D/1 TTFT p50 of `size` prefill workers at `rate`, with the prefill time corrected."""
    service = model.prefill_seconds(isl) * correction
    rho = min(rate * service / size, PREDICTION_RHO_CAP)
    return service + md1_wait(rho, service)


def _sampled(state: ControllerState, obs: Observation) -> ControllerState:
    """The state with this tick's pools sampled, keeping the samples within the traffic window."""
    now = obs.now_s
    kept = tuple(s for s in state.pool_samples if now - s[0] < obs.traffic.window_s)
    return dataclasses.replace(state, pool_samples=(*kept, (now, *obs.sizes)))


def _only_shrank(state: ControllerState, obs: Observation) -> bool:
    """Within the window no pool grew and no worker is starting or moving: its only changes were removes."""
    samples = state.pool_samples
    grew = any(b[1] > a[1] or b[2] > a[2] for a, b in zip(samples, samples[1:]))
    return not grew and not obs.settling


def update_corrections(config: ControllerConfig, model: PerfModel, state: ControllerState,
                       obs: Observation) -> tuple[ControllerState, dict[str, float]]:
    """Move the corrections toward observed / predicted p50, when the window has enough to say."""
    traffic = obs.traffic
    inputs = {"predicted_ttft_p50_s": math.nan, "predicted_tpot_p50_s": math.nan,
              "ttft_correction_updated": 0.0, "tpot_correction_updated": 0.0}
    state = _sampled(state, obs)
    prefill, decode = obs.active(PoolRole.PREFILL), obs.active(PoolRole.DECODE)
    if traffic.finished_by_class:
        state = dataclasses.replace(state, output_by_class=learn(state.output_by_class, traffic.finished_by_class))
    if traffic.finished < CORRECTION_MIN_FINISHED or not traffic.has_lengths:
        return state, inputs
    isl, _, ctx = _lengths(obs)
    ttft_c, tpot_c = state.ttft_correction, state.tpot_correction
    settled, only_shrank = _settled(state, obs), _only_shrank(state, obs)

    if prefill:
        service = model.prefill_seconds(isl) * ttft_c
        if _backlog_tokens(obs) / isl * service / len(prefill) > config.slo_ttft_s:
            state = dataclasses.replace(state, backlog_seen_s=obs.now_s)
        backlog_gone = obs.now_s - state.backlog_seen_s >= 2 * traffic.window_s
        # The window's requests ran under the pools of its ticks, not only the pool as it is now.
        sizes = [size for _, size, _ in state.pool_samples if size > 0]
        predicted = sum(_predicted_ttft(model, isl, ttft_c, traffic.arrival_rate, size) for size in sizes) / len(sizes)
        inputs["predicted_ttft_p50_s"] = predicted
        inputs["prefill_ran_under"] = sum(sizes) / len(sizes)
        observed = traffic.ttft_p50_s
        if math.isfinite(observed) and observed > 0 and predicted > 0 and backlog_gone and (settled or only_shrank):
            ttft_c = _ema(config, ttft_c, ttft_c * observed / predicted)
            inputs["ttft_correction_updated"] = 1.0

    if decode and settled:
        batch = min(max(1, round(sum(w.running for w in decode) / len(decode))), config.max_num_seqs)
        predicted = model.decode_step_seconds(batch, ctx) * tpot_c
        inputs["predicted_tpot_p50_s"] = predicted
        observed = traffic.tpot_p50_s
        if math.isfinite(observed) and observed > 0 and predicted > 0:
            tpot_c = _ema(config, tpot_c, tpot_c * observed / predicted)
            inputs["tpot_correction_updated"] = 1.0

    return dataclasses.replace(state, ttft_correction=ttft_c, tpot_correction=tpot_c), inputs


def _held_batch(config: ControllerConfig, model: PerfModel, state: ControllerState, held: int, held_tokens: float,
                arriving_batch: int) -> int:
    """B* for the requests decode holds now, at their own mean context (from the KV they use) when known, else
    the arrivals' B*. After chat gives way to long documents, the chat answers still decoding are short-context
    requests: counted at the documents' B*, they looked like two decode workers' worth of queue for a minute."""
    if held <= 0 or held_tokens <= 0:
        return arriving_batch
    context = max(1, round(held_tokens / held))
    cap = min(config.max_num_seqs, max(1, math.floor(KV_HIGH_WATER * config.kv_capacity_tokens / context)))
    return decode_capacity(model, context, cap, config.slo_tpot_s, state.tpot_correction).batch


def _pressure(config: ControllerConfig, p90: float, slo: float, need: float, size: int) -> float:
    if not (math.isfinite(p90) and p90 > slo and need >= PRESSURE_MIN_LOAD * size):
        return 1.0
    return min(p90 / slo, MAX_PRESSURE)


def estimate_early_needs(config: ControllerConfig, model: PerfModel, state: ControllerState,
                         obs: Observation) -> PoolNeeds | None:
    """Lower bounds on the needs while no request has finished, so the output lengths are unknown: the prompts
    arriving and queued (their lengths are known on arrival) and the requests decode holds (each keeps its seat at
    least until it finishes), without the steady decode need. At a cold start nothing finishes for a whole request's
    life (live, 64 tokens at ~270 ms: 17 s), while the decode seats fill and the router holds the rest. Only an add
    or a move toward decode may act on these (`controller._acts_on_early_needs`): a move away from decode or a remove
    made on a lower bound could take a worker decode needs. None when the arrivals' prompt lengths are unknown too."""
    if math.isfinite(obs.traffic.mean_output_tokens) or not math.isfinite(obs.traffic.arrived_input_tokens):
        return None
    return estimate_needs(config, model, state, obs)


def estimate_needs(config: ControllerConfig, model: PerfModel, state: ControllerState, obs: Observation) -> PoolNeeds:
    """The prefill and decode needs in workers. The traffic window must have lengths (`TrafficWindow.has_lengths`),
    or the arrivals' prompt lengths (`estimate_early_needs`, which calls this)."""
    traffic = obs.traffic
    rate = traffic.arrival_rate
    isl, osl, ctx = _demand_lengths(obs, state)
    prefill_size, decode_size = obs.sizes
    notes: list[str] = []

    # Prefill: the steady M/D/1 need, and the need to clear what is queued within the TTFT SLO.
    service_raw = model.prefill_seconds(isl)
    service = service_raw * state.ttft_correction
    u_p, ttft_reachable = prefill_max_utilisation(service, config.slo_ttft_s, PREFILL_UTILISATION_FLOOR,
                                                  PREFILL_UTILISATION_CAP)
    if not ttft_reachable:
        notes.append(f"a {isl}-token prompt alone takes {service:.3g}s of the {config.slo_ttft_s:g}s TTFT SLO, "
                     f"so prefill is planned at utilisation {u_p:.2f}")
    demand_p = rate * service
    need_p_steady = demand_p / u_p
    backlog_tokens = _backlog_tokens(obs)
    backlog_work = backlog_tokens / isl * service
    need_p_backlog = demand_p + backlog_work / config.slo_ttft_s
    need_p_base = max(need_p_steady, need_p_backlog)
    spare_p = prefill_size - demand_p
    clear_s = 0.0 if backlog_work <= 0 else backlog_work / spare_p if spare_p > 0 else math.inf
    # A tail over the SLO says the pool is short only once the window holds the split as it is: right after a move
    # its p90 is the old split's, and reading it there sent chat's decode workers back and forth after a shift.
    settled = _settled(state, obs)
    ttft_p90 = traffic.ttft_p90_s if settled else math.nan
    pressure_p = _pressure(config, ttft_p90, config.slo_ttft_s, need_p_base, prefill_size)
    need_p = need_p_base * pressure_p

    # Decode: the steady need at B*, the requests it holds now, and its KV use.
    batch_cap = config.max_num_seqs
    if config.kv_capacity_tokens > 0:
        batch_cap = min(batch_cap, max(1, math.floor(KV_HIGH_WATER * config.kv_capacity_tokens / ctx)))
    capacity = decode_capacity(model, ctx, batch_cap, config.slo_tpot_s, state.tpot_correction)
    if not capacity.slo_reachable:
        notes.append(f"even one request at context {ctx} takes {capacity.step_s:.3g}s per token, over the "
                     f"{config.slo_tpot_s:g}s TPOT SLO")
    demand_d = rate * max(osl - 1, 0)
    need_d_steady = demand_d / (capacity.tokens_per_s * DECODE_UTILISATION)
    decode = obs.active(PoolRole.DECODE)
    held = sum(w.running + w.waiting for w in decode) + traffic.router_waiting
    kv_used, kv_total = sum(w.kv_blocks_used for w in decode), sum(w.kv_blocks_total for w in decode)
    kv_fraction = kv_used / kv_total if kv_total > 0 else 0.0
    held_batch = _held_batch(config, model, state, held, kv_fraction * config.kv_capacity_tokens * decode_size,
                             capacity.batch)
    need_d_queue = held / (held_batch * DECODE_UTILISATION)
    kv_short = any(w.waiting > 0 for w in decode)
    need_d_kv = decode_size * kv_fraction / KV_HIGH_WATER if kv_short else 0.0
    need_d_base = max(need_d_steady, need_d_queue, need_d_kv)
    pressure_d = _pressure(config, traffic.tpot_p90_s if settled else math.nan, config.slo_tpot_s, need_d_base,
                           decode_size)
    need_d = need_d_base * pressure_d

    inputs = {
        "arrival_rate": rate, "isl": float(isl), "finished_isl": traffic.mean_input_tokens, "osl": float(osl),
        "finished_osl": traffic.mean_output_tokens,
        "finished": float(traffic.finished), "router_waiting": float(traffic.router_waiting),
        "ttft_p50_s": traffic.ttft_p50_s, "ttft_p90_s": traffic.ttft_p90_s,
        "tpot_p50_s": traffic.tpot_p50_s, "tpot_p90_s": traffic.tpot_p90_s, "attainment": traffic.attainment,
        "prefill_s": service_raw, "prefill_s_corrected": service, "prefill_max_utilisation": u_p,
        "prefill_demand": demand_p, "prefill_need_steady": need_p_steady,
        "prefill_backlog_tokens": float(backlog_tokens), "prefill_backlog_work_s": backlog_work,
        "prefill_need_backlog": need_p_backlog, "prefill_backlog_clear_s": clear_s, "ttft_pressure": pressure_p,
        "prefill_need": need_p,
        "decode_ctx": float(ctx), "decode_batch_cap": float(capacity.batch_cap), "decode_batch": float(capacity.batch),
        "decode_step_s_corrected": capacity.step_s, "decode_tokens_per_s": capacity.tokens_per_s,
        "decode_demand_tokens_per_s": demand_d, "decode_need_steady": need_d_steady,
        "decode_held": float(held), "decode_held_batch": float(held_batch), "decode_need_queue": need_d_queue,
        "kv_used_fraction": kv_fraction, "kv_short": float(kv_short), "decode_need_kv": need_d_kv,
        "tpot_pressure": pressure_d,
        "decode_need": need_d,
    }
    return PoolNeeds(need_p, need_d, need_p_steady, need_d_steady, inputs, tuple(notes))
