"""Benchmark metrics (percentiles, attainment, goodput), plots, and the load generator against a fake router."""

import argparse
import asyncio
import json
import math
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from pdserve.bench import plots
from pdserve.bench.load_generator import (
    OVERALL_TIMEOUT,
    LoadConfig,
    LoadGenerator,
    PoolSampler,
    RouterUnavailable,
    count_pools,
)
from pdserve.bench.metrics import (
    SLO,
    RequestRecord,
    attainment,
    attainment_series,
    find_goodput,
    goodput,
    goodput_estimate,
    percentiles,
    record_from_stream,
    summarize,
)
from pdserve.bench.plots import plot_attainment_vs_rate, plot_latency_cdfs, plot_timeline
from pdserve.bench.report import format_summary, strict_json
from pdserve.bench.workloads import TraceEntry
from pdserve.cli import bench as bench_cli
from pdserve.proto import generation_pb2 as pb
from pdserve.proto import generation_pb2_grpc as pb_grpc
from pdserve.registry.entries import Role, WorkerInfo, WorkerState

REJECTED_PROMPT_LEN = 7
PAIRED_PROMPT_LEN = 9  # the fake sends two tokens a message


def _record(ttft=0.1, tpot=0.01, ok=True, tokens=10, arrival=0.0, error=""):
    return RequestRecord("r", arrival, 5, tokens, math.nan, ttft, tpot, 1.0, (tpot,) * (tokens - 1), ok, error)


# ---- metrics -------------------------------------------------------------------------------------------------
def test_percentiles_match_numpy_and_skip_nan():
    values = list(np.random.default_rng(0).exponential(size=1001))
    got = percentiles(values + [math.nan, math.inf])
    want = np.percentile(values, [50, 90, 95, 99])
    assert list(got) == ["p50", "p90", "p95", "p99"]
    assert list(got.values()) == pytest.approx(list(want))
    assert all(math.isnan(v) for v in percentiles([]).values())
    assert all(math.isnan(v) for v in percentiles([math.nan]).values())
    assert percentiles([1.0, 2.0], qs=(50, 99.9)).keys() == {"p50", "p99.9"}


def test_record_from_stream_times_every_token():
    r = record_from_stream("a", 1.0, 4, sent=10.0, token_times=[(10.5, 1), (10.6, 2), (10.9, 1)], end=11.0)
    assert r.output_tokens == 4
    assert r.ttft_s == pytest.approx(0.5)
    assert r.itl_s == pytest.approx((0.1, 0.0, 0.3))
    assert r.tpot_s == pytest.approx(0.4 / 3) == pytest.approx(sum(r.itl_s) / len(r.itl_s))
    assert r.e2e_s == pytest.approx(1.0)
    one = record_from_stream("b", 0.0, 4, sent=0.0, token_times=[(0.2, 1)], end=0.3)
    assert math.isnan(one.tpot_s) and one.itl_s == ()
    assert SLO(0.5, 0.001).met(one)
    none = record_from_stream("c", 0.0, 4, sent=0.0, token_times=[], end=0.3, ok=False, error="UNAVAILABLE: x")
    assert math.isnan(none.ttft_s) and none.output_tokens == 0


def test_attainment_counts_failed_requests_as_misses():
    slo = SLO(ttft_s=0.5, tpot_s=0.05)
    records = [_record(), _record(), _record(ttft=0.6), _record(tpot=0.06), _record(ok=False, error="UNAVAILABLE: x")]
    assert attainment(records, slo) == pytest.approx(2 / 5)
    assert math.isnan(attainment([], slo))
    summary = summarize(records, slo, duration_s=2.0)
    assert (summary.requests, summary.ok, summary.failed) == (5, 4, 1)
    assert summary.errors == {"UNAVAILABLE": 1}
    assert summary.request_throughput == pytest.approx(2.0)
    assert summary.output_throughput == pytest.approx(25.0)
    assert summary.ttft_s["p50"] == pytest.approx(0.1)
    text = json.dumps(strict_json(summary.to_dict()), allow_nan=False)
    assert json.loads(text)["queue_s"]["p50"] is None
    assert "SLO attainment 40.0%" in format_summary(summary)
    with pytest.raises(ValueError, match="ttft_s"):
        SLO(0, 1)


def test_attainment_series_windows_by_arrival():
    slo = SLO(0.5, 0.05)
    records = [_record(arrival=t, ttft=0.1 if t < 10 else 1.0) for t in np.arange(0, 20, 0.5)]
    series = dict(attainment_series(records, slo, window_s=5, step_s=1))
    assert series[5.0] == 1.0 and series[20.0] == 0.0 and 0 < series[12.0] < 1


def test_goodput_is_the_highest_passing_rate_even_when_not_monotone():
    points = [(1.0, 0.99), (2.0, 0.85), (3.0, 0.92), (4.0, 0.5)]
    assert goodput(points) == 3.0
    estimate = goodput_estimate(points)
    assert estimate.interpolated == pytest.approx(3.0 + (0.92 - 0.9) / (0.92 - 0.5))
    assert estimate.points == tuple(sorted(points))
    assert goodput([(4.0, 0.95), (1.0, 0.99)]) == 4.0
    assert goodput_estimate([(4.0, 0.95)]).interpolated == 4.0
    assert goodput([(1.0, 0.5), (2.0, 0.1)]) == 0.0
    assert goodput([]) == 0.0
    assert goodput(points, target=0.95) == 1.0


def test_find_goodput_bisects_to_the_threshold():
    threshold = 3.7

    def run(rate):  # attainment falls through 0.9 at the threshold
        return 0.99 if rate <= threshold else 0.5

    search = find_goodput(run, low=0.5, high=10.0, tolerance=0.05, max_runs=20)
    assert search.goodput.rate <= threshold < search.goodput.rate + 0.05
    assert search.points[:2] == ((0.5, 0.99), (10.0, 0.5))
    capped = find_goodput(run, 0.5, 10.0, tolerance=0.001, max_runs=4)
    assert len(capped.points) == 4
    assert find_goodput(run, 5.0, 10.0, 0.1).points == ((5.0, 0.5),)  # low misses: stop
    assert find_goodput(run, 0.5, 2.0, 0.1).goodput.rate == 2.0  # high passes: stop
    with pytest.raises(ValueError, match="low < high"):
        find_goodput(run, 2.0, 1.0, 0.1)


# ---- plots ---------------------------------------------------------------------------------------------------
def test_plots_write_png_files(tmp_path):
    slo = SLO(0.5, 0.05)
    records = [_record(arrival=t, ttft=0.1 + t / 100) for t in np.arange(0, 30, 0.3)] + [_record(ok=False)]
    paths = [tmp_path / name for name in ("cdf.png", "rate.png", "timeline.png", "empty.png")]
    plot_latency_cdfs(records, slo, str(paths[0]))
    plot_attainment_vs_rate([(1, 0.99), (2, 0.95), (3, 0.6)], 2.0, str(paths[1]))
    plot_timeline([r.arrival_s for r in records], [(0.0, 1, 1), (10.0, 2, 1), (20.0, 1, 2)],
                  attainment_series(records, slo), str(paths[2]), "timeline")
    plot_timeline([], [], [], str(paths[3]))
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the load generator against a fake router ------------------------------------------------------------------
TOKEN_GAP_S = 0.002


def _fake_answer(request):
    """(error, responses) of the fake router: max_tokens tokens, one a message (two for a 9-token prompt); a 7-token
    prompt is rejected."""
    prompt = list(request.token_ids.ids)
    if len(prompt) == REJECTED_PROMPT_LEN:
        return (grpc.StatusCode.INVALID_ARGUMENT, "prompt: too long for the fake"), ()
    if not all(1000 <= t < 32000 for t in prompt):
        return (grpc.StatusCode.INVALID_ARGUMENT, "token id out of range"), ()
    n, step = request.sampling.max_tokens, 2 if len(prompt) == PAIRED_PROMPT_LEN else 1

    def responses():
        for i in range(0, n, step):
            response = pb.GenerateResponse(request_id=request.request_id, token_ids=list(range(i, min(n, i + step))))
            if i + step >= n:
                response.finish_reason = pb.FINISH_REASON_LENGTH
                response.timings.CopyFrom(pb.Timings(queue_s=0.25))
            yield response

    return None, responses()


class FakeGeneration(pb_grpc.GenerationServicer):
    """A grpc.aio fake router (see `_fake_answer`), TOKEN_GAP_S between messages; counts requests in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0

    async def Generate(self, request, context):
        error, responses = _fake_answer(request)
        if error:
            await context.abort(*error)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for response in responses:
                await asyncio.sleep(TOKEN_GAP_S)
                yield response
        finally:
            self.in_flight -= 1


class ThreadedFakeGeneration(pb_grpc.GenerationServicer):
    """The same fake on a thread-pool server, for the CLI (which runs its own event loop: grpc.aio servers do not
    outlive a second loop in one process)."""

    def Generate(self, request, context):
        error, responses = _fake_answer(request)
        if error:
            context.abort(*error)
        for response in responses:
            time.sleep(TOKEN_GAP_S)
            yield response


def _against_fake(trace, sampler=None, **config):
    """Runs the load generator and a fresh fake router in one event loop: (RunResult, the fake)."""
    async def main():
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        fake = FakeGeneration()
        pb_grpc.add_GenerationServicer_to_server(fake, server)
        await server.start()
        try:
            load = LoadConfig(router=f"127.0.0.1:{port}", progress=False, **config)
            return await LoadGenerator(load).run_async(trace, sampler), fake
        finally:
            await server.stop(None)

    return asyncio.run(main())


def test_open_loop_records_tokens_latencies_and_errors():
    trace = [TraceEntry(0.0, 16, 5), TraceEntry(0.01, REJECTED_PROMPT_LEN, 4), TraceEntry(0.02, PAIRED_PROMPT_LEN, 6),
             TraceEntry(0.05, 3, 1)]
    result, _ = _against_fake(trace)
    records = sorted(result.records, key=lambda r: r.arrival_s)
    assert len(records) == 4 and result.not_sent == 0
    ok, rejected, paired, single = records
    assert ok.ok and ok.output_tokens == 5 and ok.ttft_s > 0 and len(ok.itl_s) == 4 and ok.queue_s == 0.25
    assert ok.tpot_s == pytest.approx(sum(ok.itl_s) / 4) and ok.e2e_s >= ok.ttft_s
    assert not rejected.ok and rejected.output_tokens == 0
    assert rejected.error.startswith("INVALID_ARGUMENT: prompt: too long")
    assert paired.output_tokens == 6 and len(paired.itl_s) == 5 and paired.itl_s.count(0.0) == 3
    assert single.output_tokens == 1 and math.isnan(single.tpot_s) and single.itl_s == ()
    assert [r.arrival_s for r in records] == pytest.approx([0.0, 0.01, 0.02, 0.05], abs=0.05)
    assert result.duration_s > 0.05


def test_closed_loop_keeps_n_in_flight():
    trace = [TraceEntry(100.0, 20, 8)] * 12  # arrival times are ignored
    result, fake = _against_fake(trace, concurrency=3, max_requests=10)
    assert len(result.records) == 10 and result.not_sent == 2 and all(r.ok for r in result.records)
    assert fake.max_in_flight == 3
    assert result.duration_s < 5


def test_closed_loop_stops_sending_after_send_until():
    result, _ = _against_fake([TraceEntry(0.0, 20, 10)] * 10_000, concurrency=2, send_until_s=0.2)
    assert 2 <= len(result.records) < 10_000 and all(r.ok for r in result.records)
    assert result.not_sent == 10_000 - len(result.records)


def test_timeouts_per_request_and_overall():
    slow = [TraceEntry(0.0, 20, 5000), TraceEntry(0.0, 20, 3)]
    result, _ = _against_fake(slow, timeout_s=0.2)
    errors = sorted(r.error.split(":")[0] for r in result.records)
    assert errors == ["", "DEADLINE_EXCEEDED"]
    later = [TraceEntry(0.0, 20, 5000), TraceEntry(0.0, 20, 3), TraceEntry(30.0, 20, 3)]
    result, _ = _against_fake(later, deadline_s=0.3)
    assert len(result.records) == 2 and result.not_sent == 1 and result.duration_s < 2
    cut = next(r for r in result.records if not r.ok)
    assert cut.error == OVERALL_TIMEOUT and cut.output_tokens > 0


def test_router_unavailable_is_reported():
    config = LoadConfig(router="127.0.0.1:1", connect_timeout_s=0.3, progress=False)
    with pytest.raises(RouterUnavailable, match="does not answer"):
        LoadGenerator(config).run([TraceEntry(0, 1, 1)])


def test_pool_sampler_counts_ready_workers():
    def worker(i, role, state=WorkerState.READY):
        return WorkerInfo(f"w{i}", role, f"a{i}", i, state)

    workers = [worker(1, Role.PREFILL), worker(2, Role.DECODE), worker(3, Role.DECODE),
               worker(4, Role.PREFILL, WorkerState.DRAINING)]
    assert count_pools(workers) == (1, 2, 0, 1)
    sampler = PoolSampler(lambda: workers, interval_s=0.05)
    result, _ = _against_fake([TraceEntry(0.0, 20, 3), TraceEntry(0.2, 20, 3)], sampler)
    assert len(result.pool_samples) >= 2
    assert (result.pool_samples[0].n_prefill, result.pool_samples[0].n_decode) == (1, 2)


# ---- the CLI ---------------------------------------------------------------------------------------------------
def _parse(argv):
    parser = argparse.ArgumentParser()
    bench_cli.register(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


@pytest.fixture
def threaded_fake():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    port = server.add_insecure_port("127.0.0.1:0")
    pb_grpc.add_GenerationServicer_to_server(ThreadedFakeGeneration(), server)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None).wait(5)


def test_cli_runs_a_sweep_and_writes_the_report(threaded_fake, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PDSERVE_STATE_DIR", str(tmp_path / "state"))
    for name, path_index in (("plot_latency_cdfs", 2), ("plot_timeline", 3), ("plot_attainment_vs_rate", 2)):
        # Drawing is slow here and tested above: note the file only.
        monkeypatch.setattr(plots, name, lambda *args, i=path_index: open(args[i], "wb").close())
    out = tmp_path / "out"
    args = _parse(["--router", threaded_fake, "--workload", "chat", "--sweep", "20,40", "--num-requests", "6",
                   "--max-input-tokens", "64", "--max-output-tokens", "6", "--out", str(out), "--quiet",
                   "--slo-ttft", "1", "--slo-tpot", "0.5"])
    assert bench_cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "goodput 40 req/s at >= 90% attainment (at least" in printed and "TTFT (ms)" in printed
    report = json.loads((out / "report.json").read_text())
    assert [run["rate"] for run in report["runs"]] == [20, 40]
    assert report["sweep"]["rate"] == 40 and report["runs"][0]["summary"]["ok"] == 6
    assert report["config"]["workload"] == "chat" and report["runs"][1]["trace"]["requests"] == 6
    written = {p.name for p in out.iterdir()}
    assert {"latency-r20.png", "timeline-r40.png", "attainment_vs_rate.png"} <= written


def test_cli_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PDSERVE_STATE_DIR", str(tmp_path / "state"))
    assert bench_cli.run(_parse(["--num-requests", "3"])) == 2
    assert "no cluster is up" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_s": 0, "input_tokens": 3, "output_tokens": 2}\n{"arrival_s": 1, "input_tokens": 3}\n')
    assert bench_cli.run(_parse(["--trace", str(bad), "--router", "127.0.0.1:1"])) == 2
    assert "line 2: output_tokens: missing" in capsys.readouterr().err
    assert bench_cli.run(_parse(["--sweep", "1,x", "--router", "127.0.0.1:1"])) == 2
    assert "--sweep" in capsys.readouterr().err
    assert bench_cli.run(_parse(["--concurrency", "0", "--router", "127.0.0.1:1"])) == 2
    assert "--concurrency: must be >= 1" in capsys.readouterr().err


def test_cli_plans_a_rescaled_clipped_trace_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"arrival_s": t, "input_tokens": 100, "output_tokens": 50}) + "\n"
                            for t in (0, 1, 2, 3, 4)))
    (run,) = bench_cli.plan_runs(_parse(["--trace", str(path), "--rate", "4", "--max-input-tokens", "64"]))
    assert run.rate == 4 and [e.arrival_s for e in run.trace] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert {(e.input_tokens, e.output_tokens) for e in run.trace} == {(64, 50)}
    assert run.deadline_s == pytest.approx(1.0 + 120 + bench_cli.DEADLINE_GRACE_S)
    (closed,) = bench_cli.plan_runs(_parse(["--concurrency", "2", "--duration-s", "5"]))
    assert closed.rate is None and closed.send_until_s == 5 and len(closed.trace) == bench_cli.CLOSED_LOOP_REQUESTS
