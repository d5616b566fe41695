"""Prometheus metrics: the router's per-request histograms and outcomes, a worker's load, steps, handoffs and MFU/MBU,
the /metrics HTTP server, and the registry/state/config fields that advertise where they are served."""

import asyncio
import json
import time
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.config import Router, parse_config
from pdserve.control_plane.state_file import ClusterState
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine import EngineConfig, SamplingParams
from pdserve.engine.config import ConfigError
from pdserve.engine.cost_model import StepCost
from pdserve.engine.engine_load import EngineLoad
from pdserve.engine.hardware import HARDWARE
from pdserve.engine.request import FinishReason, RequestOutput
from pdserve.engine.scheduler import ScheduledChunk, SchedulerOutput
from pdserve.kv_transfer.connector import TransferResult, TransferStatus
from pdserve.kv_transfer.in_process import Exchange, InProcessConnector
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve.registry.entries import Role, WorkerInfo, WorkerState
from pdserve.router.errors import DuplicateRequest, Unavailable
from pdserve.router.metrics import RouterMetrics, start_router_metrics
from pdserve.router.timings import RequestClock, Timings
from pdserve.worker.messages import DecodeTask, Owner, PrefillTask
from pdserve.worker.metrics import WorkerMetrics
from pdserve.worker.runtime import WorkerSpec

from .test_workers_in_process import LocalPeers


def text(registry) -> str:
    return generate_latest(registry).decode()


def sample(registry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, labels)


# ---- router -----------------------------------------------------------------------------------------------------
def test_router_records_a_finished_requests_timings():
    streams = {"a": 1, "b": 2}
    metrics = RouterMetrics(in_flight=lambda: len(streams))
    timings = Timings(queue_s=0.01, prefill_s=0.2, kv_transfer_s=0.003, ttft_s=0.25, tpot_s=0.02, e2e_s=1.0)
    metrics.finished(timings, FinishReason.LENGTH.value, prompt_tokens=90, generation_tokens=38)
    metrics.finished(Timings(0.0, 0.1, 0.0, 0.1, 0.0, 0.1), FinishReason.STOP.value, 5, 1)
    r = metrics.registry
    assert sample(r, "pdserve_time_to_first_token_seconds_count") == 2
    assert sample(r, "pdserve_time_to_first_token_seconds_sum") == pytest.approx(0.35)
    assert sample(r, "pdserve_time_per_output_token_seconds_count") == 1  # one token: no TPOT
    assert sample(r, "pdserve_request_kv_transfer_time_seconds_count") == 1  # colocated: none
    assert sample(r, "pdserve_e2e_request_latency_seconds_bucket", le="1.0") == 2
    assert sample(r, "pdserve_request_queue_time_seconds_count") == 2
    assert sample(r, "pdserve_request_prompt_tokens_sum") == 95
    assert sample(r, "pdserve_request_generation_tokens_bucket", le="32.0") == 1
    assert sample(r, "pdserve_requests_total", outcome="length") == 1
    assert sample(r, "pdserve_requests_total", outcome="stop") == 1
    assert sample(r, "pdserve_requests_total", outcome="unavailable") == 0
    assert sample(r, "pdserve_requests_in_flight") == 2
    body = text(r)
    assert 'pdserve_time_to_first_token_seconds_count 2.0' in body
    assert 'pdserve_requests_total{outcome="length"} 1.0' in body


def test_router_counts_errors_by_kind():
    metrics = RouterMetrics()
    for error in (Unavailable("x"), Unavailable("y"), DuplicateRequest("z"), asyncio.CancelledError(),
                  GeneratorExit(), KeyError("k")):
        metrics.failed(error)
    r = metrics.registry
    assert sample(r, "pdserve_requests_total", outcome="unavailable") == 2
    assert sample(r, "pdserve_requests_total", outcome="duplicate") == 1
    assert sample(r, "pdserve_requests_total", outcome="cancelled") == 2
    assert sample(r, "pdserve_requests_total", outcome="error") == 1


def test_waiting_gauge_and_inter_token_gaps():
    metrics = RouterMetrics()
    with metrics.waiting.track_inprogress():
        assert sample(metrics.registry, "pdserve_requests_waiting_for_room") == 1
    assert sample(metrics.registry, "pdserve_requests_waiting_for_room") == 0
    clock = RequestClock()
    assert clock.tokens_sent(1) is None  # the first token has no gap
    assert clock.tokens_sent(0) is None
    time.sleep(0.01)
    gap = clock.tokens_sent(2)
    assert gap is not None and 0.009 < gap < 1.0
    assert clock.tokens == 3


def test_two_metrics_objects_in_one_process_do_not_collide():
    a, b = RouterMetrics(), RouterMetrics()
    a.failed(Unavailable("x"))
    assert sample(b.registry, "pdserve_requests_total", outcome="unavailable") == 0
    WorkerMetrics("w-0", "decode", lambda: None)
    WorkerMetrics("w-0", "decode", lambda: None)


# ---- worker -----------------------------------------------------------------------------------------------------
def fake_engine(simulated: bool = False, **attrs):
    engine = SimpleNamespace(config=SimpleNamespace(simulated=simulated, tensor_parallel=1,
                                                    speculative=SimpleNamespace(method="draft")),
                             preemptions_total=0, runner=SimpleNamespace(last_cost=None), prompt_tokens_total=0,
                             cached_tokens_total=0, speculative_steps_total=0, speculative_proposed_total=0,
                             speculative_accepted_total=0,
                             blocks=SimpleNamespace(evictions=0), **attrs)
    if simulated:
        engine.cost_model = SimpleNamespace(hardware=HARDWARE["h100"], tensor_parallel=1)
    return engine


def output(request_id: str, prompt: int, tokens: int, finish: FinishReason | None = None) -> RequestOutput:
    return RequestOutput(request_id=request_id, prompt_token_ids=tuple(range(prompt)), token_ids=(7,) * tokens,
                         new_token_ids=(7,), text="", text_delta="", finish_reason=finish)


def chunk(request_id: str, tokens: int, start: int, output_index: int) -> ScheduledChunk:
    return ScheduledChunk(request_id, (1,) * tokens, start, (0,), True, SamplingParams(), output_index)


def test_worker_load_gauges_read_the_latest_load():
    load = EngineLoad(running=3, waiting=2, held=1, queued_prefill_tokens=400, kv_blocks_used=10, kv_blocks_total=64)
    current = {"load": None}
    metrics = WorkerMetrics("decode-0", "decode", lambda: current["load"])
    labels = {"worker_id": "decode-0", "role": "decode"}
    assert sample(metrics.registry, "pdserve_worker_requests_running", **labels) == 0  # no engine yet
    current["load"] = load
    r = metrics.registry
    assert sample(r, "pdserve_worker_requests_running", **labels) == 3
    assert sample(r, "pdserve_worker_requests_waiting", **labels) == 2
    assert sample(r, "pdserve_worker_requests_held", **labels) == 1
    assert sample(r, "pdserve_worker_queued_prefill_tokens", **labels) == 400
    assert sample(r, "pdserve_worker_kv_blocks_used", **labels) == 10
    assert sample(r, "pdserve_worker_kv_blocks_total", **labels) == 64


def test_worker_kv_pairs_counted_by_transport_at_each_scrape():
    pairs: dict[str, int] = {}
    metrics = WorkerMetrics("decode-0", "decode", lambda: None, pairs=lambda: dict(pairs))
    labels = {"worker_id": "decode-0", "role": "decode"}
    assert sample(metrics.registry, "pdserve_worker_kv_pairs", **labels, transport="ipc") is None  # none yet
    pairs.update(ipc=2, gloo=1)
    assert sample(metrics.registry, "pdserve_worker_kv_pairs", **labels, transport="ipc") == 2
    assert sample(metrics.registry, "pdserve_worker_kv_pairs", **labels, transport="gloo") == 1


def test_worker_step_read_off_the_outputs():
    metrics = WorkerMetrics("both-0", "both", lambda: None)
    engine = fake_engine()
    labels = {"worker_id": "both-0", "role": "both"}
    # A prompt of 90 finishes its prefill (first token) while two requests decode.
    metrics.step(engine, [output("a", 90, 1), output("b", 5, 3), output("c", 5, 9, FinishReason.STOP)], 0.05)
    engine.preemptions_total = 2
    metrics.step(engine, [], 0.01)  # a step that sampled nothing: not counted as a step
    r = metrics.registry
    assert sample(r, "pdserve_worker_step_seconds_count", **labels) == 1
    assert sample(r, "pdserve_worker_step_seconds_sum", **labels) == pytest.approx(0.05)
    assert sample(r, "pdserve_worker_step_requests_sum", **labels) == 3
    assert sample(r, "pdserve_worker_prefill_tokens_total", **labels) == 90
    assert sample(r, "pdserve_worker_decode_tokens_total", **labels) == 2
    assert sample(r, "pdserve_worker_preemptions_total", **labels) == 2
    assert sample(r, "pdserve_worker_mfu", **labels) is None  # a torch engine: no known peak, no sample
    assert "pdserve_worker_mfu" in text(r)  # described all the same


def test_worker_step_exact_from_the_schedule():
    engine = fake_engine(last_schedule=SchedulerOutput(chunks=(
        chunk("a", 64, 0, 0), chunk("b", 1, 40, 3), chunk("c", 1, 12, 1), chunk("d", 20, 30, 2))))  # d: recompute
    metrics = WorkerMetrics("both-0", "both", lambda: None)
    metrics.step(engine, [], 0.02)
    labels = {"worker_id": "both-0", "role": "both"}
    r = metrics.registry
    assert sample(r, "pdserve_worker_step_requests_sum", **labels) == 4
    assert sample(r, "pdserve_worker_prefill_tokens_total", **labels) == 84

    assert sample(r, "pdserve_worker_decode_tokens_total", **labels) == 2
    engine.last_schedule = SchedulerOutput(chunks=())
    engine.prompt_tokens_total, engine.cached_tokens_total, engine.blocks.evictions = 300, 128, 5
    engine.speculative_proposed_total, engine.speculative_accepted_total, engine.speculative_steps_total = 40, 25, 10
    metrics.step(engine, [], 0.001)  # nothing scheduled
    assert sample(r, "pdserve_worker_speculative_steps_total", **labels, method="draft") == 10
    assert sample(r, "pdserve_worker_speculative_proposed_tokens_total", **labels, method="draft") == 40
    assert sample(r, "pdserve_worker_speculative_accepted_tokens_total", **labels, method="draft") == 25
    assert sample(r, "pdserve_worker_prefix_cache_queried_tokens_total", **labels) == 300
    assert sample(r, "pdserve_worker_prefix_cache_hit_tokens_total", **labels) == 128
    assert sample(r, "pdserve_worker_prefix_cache_evictions_total", **labels) == 5
    assert sample(r, "pdserve_worker_step_seconds_count", **labels) == 1


def test_worker_mfu_and_mbu_of_a_known_cost():
    h100 = HARDWARE["h100"]
    engine = fake_engine(simulated=True)
    metrics = WorkerMetrics("prefill-0", "prefill", lambda: None, window=2)
    labels = {"worker_id": "prefill-0", "role": "prefill"}

    def step(flops: float, nbytes: float, seconds: float) -> None:
        engine.runner.last_cost = StepCost(flops=flops, bytes=nbytes, compute_s=0.0, memory_s=0.0, comm_s=0.0,
                                           seconds=seconds)
        metrics.step(engine, [output("a", 8, 2)], seconds)

    step(0.5 * h100.peak_flops * 0.01, 0.25 * h100.hbm_bytes_per_s * 0.01, 0.01)  # 50% MFU, 25% MBU
    r = metrics.registry
    assert sample(r, "pdserve_worker_mfu", **labels) == pytest.approx(0.5)
    assert sample(r, "pdserve_worker_mbu", **labels) == pytest.approx(0.25)
    step(0.1 * h100.peak_flops * 0.03, 0.9 * h100.hbm_bytes_per_s * 0.03, 0.03)
    # Window of two steps, weighted by time: (0.5 * 0.01 + 0.1 * 0.03) / 0.04.
    assert sample(r, "pdserve_worker_mfu", **labels) == pytest.approx(0.2)
    assert sample(r, "pdserve_worker_mbu", **labels) == pytest.approx((0.25 * 0.01 + 0.9 * 0.03) / 0.04)
    metrics.step(engine, [output("a", 8, 3)], 0.03)  # the runner did not run again: same cost, not counted twice
    assert sample(r, "pdserve_worker_mfu", **labels) == pytest.approx(0.2)
    step(0.4 * h100.peak_flops * 0.01, 0.0, 0.01)  # the first step leaves the window
    assert sample(r, "pdserve_worker_mfu", **labels) == pytest.approx((0.1 * 0.03 + 0.4 * 0.01) / 0.04)


def test_worker_kv_transfers():
    metrics = WorkerMetrics("decode-0", "decode", lambda: None)
    metrics.transfer(TransferResult("a", TransferStatus.DONE, seconds=0.004, bytes=1 << 20))
    metrics.transfer(TransferResult("b", TransferStatus.DONE, seconds=0.002, bytes=1 << 20))
    metrics.transfer(TransferResult("no-kv:c", TransferStatus.DONE))  # "no KV": nothing moved
    metrics.transfer(TransferResult("d", TransferStatus.TIMED_OUT, "deadline", seconds=30.0))
    labels = {"worker_id": "decode-0", "role": "decode"}
    r = metrics.registry
    assert sample(r, "pdserve_worker_kv_transfers_total", status="done", **labels) == 3
    assert sample(r, "pdserve_worker_kv_transfers_total", status="timed_out", **labels) == 1
    assert sample(r, "pdserve_worker_kv_transfers_total", status="failed", **labels) == 0
    assert sample(r, "pdserve_worker_kv_transfer_seconds_count", **labels) == 2
    assert sample(r, "pdserve_worker_kv_transfer_seconds_sum", **labels) == pytest.approx(0.006)
    assert sample(r, "pdserve_worker_kv_transfer_bytes_total", **labels) == 2 << 20


# ---- serving ----------------------------------------------------------------------------------------------------
def parsed(body: str) -> dict[tuple, float]:
    return {key(s.name, **s.labels): s.value for family in text_string_to_metric_families(body)
            for s in family.samples}


def key(name: str, **labels) -> tuple:
    return name, frozenset(labels.items())


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        return response.read().decode()


def test_http_server_on_localhost_serves_metrics():
    metrics = RouterMetrics()
    metrics.failed(Unavailable("x"))
    server = start_router_metrics(metrics, 0)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        body = scrape(server.address)
        assert 'pdserve_requests_total{outcome="unavailable"} 1.0' in body
        assert "pdserve_time_to_first_token_seconds_bucket" in body
        with pytest.raises(OSError, match="router.metrics_port"):
            start_router_metrics(RouterMetrics(), server.port)  # taken
    finally:
        server.stop()


def test_workers_serve_their_metrics_and_advertise_the_port():
    """A sim prefill and decode worker in this process: one handed-off request shows in both workers' /metrics."""
    config = EngineConfig(model="random:smollm2-135m", backend="sim", num_kv_blocks=64, max_num_batched_tokens=64)

    async def run() -> tuple[str, str, WorkerInfo, WorkerInfo]:
        exchange, peers = Exchange(), LocalPeers()
        prefill = PrefillWorker(WorkerSpec("prefill-0", Role.PREFILL, config),
                                InProcessConnector("prefill-0", exchange), peers=peers)
        decode = peers.workers["decode-0"] = DecodeWorker(WorkerSpec("decode-0", Role.DECODE, config),
                                                          InProcessConnector("decode-0", exchange))
        p_info, d_info = await asyncio.gather(prefill.start(), decode.start())
        try:
            sampling = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
            prompt = tuple(range(100, 190))  # 90 tokens: two prefill chunks
            reservation = await decode.reserve(DecodeTask("r1", prompt, sampling, Owner("router", "r1"), "prefill-0"))
            await prefill.prefill(PrefillTask("r1", prompt, sampling, "decode-0", reservation.tag))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if any(e.finish_reason is not None for e in await decode.events("router", 0.5)):
                    break
            while time.monotonic() < deadline:  # the prefill side polls its send's outcome on its next loop
                p_body = await asyncio.to_thread(scrape, f"127.0.0.1:{p_info.metrics_port}")
                if parsed(p_body)[key("pdserve_worker_kv_transfers_total", status="done", worker_id="prefill-0",
                                      role="prefill")]:
                    break
                await asyncio.sleep(0.01)
            d_body = await asyncio.to_thread(scrape, f"127.0.0.1:{d_info.metrics_port}")
            return p_body, d_body, await prefill.info(), await decode.info()
        finally:
            await prefill.stop()
            await decode.stop()

    p_body, d_body, p_info, d_info = asyncio.run(run())
    assert p_info.metrics_port > 0 and d_info.metrics_port > 0 and p_info.metrics_port != d_info.metrics_port
    p, d = parsed(p_body), parsed(d_body)
    p_labels = {"worker_id": "prefill-0", "role": "prefill"}
    d_labels = {"worker_id": "decode-0", "role": "decode"}
    assert p[key("pdserve_worker_kv_blocks_total", **p_labels)] == 64
    assert p[key("pdserve_worker_prefill_tokens_total", **p_labels)] == 90
    assert p[key("pdserve_worker_step_seconds_count", **p_labels)] >= 1
    assert p[key("pdserve_worker_kv_transfers_total", status="done", **p_labels)] == 1
    assert 0 < p[key("pdserve_worker_mbu", **p_labels)] < 1  # a sim engine knows its peak
    assert d[key("pdserve_worker_decode_tokens_total", **d_labels)] == 5  # 6 tokens: the first from the prefill
    assert d[key("pdserve_worker_kv_transfer_seconds_count", **d_labels)] == 1
    assert d[key("pdserve_worker_kv_transfer_bytes_total", **d_labels)] > 0


# ---- where the metrics are advertised -----------------------------------------------------------------------------
def test_worker_info_json_round_trip_and_old_entries():
    info = WorkerInfo("decode-0", Role.DECODE, "default-decode-0", 42, WorkerState.READY, metrics_port=9123)
    assert WorkerInfo.from_json(info.to_json()) == info
    old = json.loads(info.to_json())
    del old["metrics_port"]
    assert WorkerInfo.from_json(json.dumps(old)).metrics_port == 0


def test_cluster_state_keeps_the_metrics_address(tmp_path):
    path = str(tmp_path / "state.json")
    ClusterState(1, "127.0.0.1:50051", "redis://x", None, "colocated", "127.0.0.1:9100").write(path)
    assert ClusterState.read(path).metrics_address == "127.0.0.1:9100"
    with open(path, "w") as f:
        json.dump({"pid": 1, "router_address": "a", "redis_url": "r", "redis_pid": None, "mode": "colocated"}, f)
    assert ClusterState.read(path).metrics_address == ""


def test_router_metrics_port_config():
    assert parse_config({"router": {"metrics_port": 9100}}).router.metrics_port == 9100
    assert parse_config({}).router.metrics_port is None
    with pytest.raises(ConfigError, match="router.metrics_port: must be a port number"):
        parse_config({"router": {"metrics_port": 70000}})
    with pytest.raises(ConfigError, match="metrics_port"):
        Router(metrics_port=0)


def test_fleet_metrics_count_workers_by_role_and_state_and_add_up_worker_seconds():
    from pdserve.registry.entries import Role, WorkerInfo, WorkerState
    from pdserve.router.fleet_metrics import MAX_GAP_S

    now = [100.0]
    metrics = RouterMetrics()
    metrics.fleet._clock = lambda: now[0]

    def worker(worker_id: str, role: Role, state: WorkerState) -> WorkerInfo:
        return WorkerInfo(worker_id=worker_id, role=role, actor_name="", pid=0, state=state)

    fleet = [worker("p0", Role.PREFILL, WorkerState.READY), worker("d0", Role.DECODE, WorkerState.READY),
             worker("d1", Role.DECODE, WorkerState.STARTING)]
    metrics.fleet.observe(fleet)
    now[0] += 2.0
    metrics.fleet.observe(fleet[:2] + [worker("d1", Role.DECODE, WorkerState.READY),
                                       worker("d2", Role.DECODE, WorkerState.STOPPED)])
    registry = metrics.registry
    assert sample(registry, "pdserve_workers", role="decode", state="ready") == 2
    assert sample(registry, "pdserve_workers", role="decode", state="starting") == 0
    assert sample(registry, "pdserve_worker_seconds_total", role="decode") == 4.0  # two decode workers for 2 s
    now[0] += 60.0  # a long pause (Redis away): only MAX_GAP_S counted
    metrics.fleet.observe([])
    assert sample(registry, "pdserve_worker_seconds_total", role="prefill") == 2.0 + MAX_GAP_S
    assert sample(registry, "pdserve_workers", role="decode", state="ready") == 0
