"""Benchmark workloads: seeded traces, documented length means, arrival burstiness, trace files, phases, rescaling."""

import json

import numpy as np
import pytest

from pdserve.bench.traffic import traffic_of
from pdserve.bench.workloads import (
    WORKLOADS,
    Phase,
    TraceEntry,
    TraceError,
    make_trace,
    named_trace,
    parse_phases,
    phase_trace,
    read_trace,
    scale_phases,
    scale_rate,
    write_trace,
)

DOCUMENTED_MEANS = {"chat": (396, 244), "summarization": (3930, 150), "code": (1490, 60)}


def _cv(entries):
    gaps = np.diff([0.0] + [e.arrival_s for e in entries])
    return float(np.std(gaps) / np.mean(gaps))


def test_same_seed_same_trace_other_seed_other_trace():
    a = make_trace("chat", 2.0, duration_s=30, seed=7)
    assert a == make_trace("chat", 2.0, duration_s=30, seed=7)
    assert a != make_trace("chat", 2.0, duration_s=30, seed=8)
    assert all(x.arrival_s < y.arrival_s for x, y in zip(a, a[1:]))
    assert a[-1].arrival_s < 30


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_length_means_match_the_documented_table(name):
    trace = make_trace(name, 10.0, num_requests=40_000, seed=1)
    inputs = np.array([e.input_tokens for e in trace])
    outputs = np.array([e.output_tokens for e in trace])
    want_in, want_out = DOCUMENTED_MEANS[name]
    assert inputs.mean() == pytest.approx(want_in, rel=0.03)
    assert outputs.mean() == pytest.approx(want_out, rel=0.03)
    w = WORKLOADS[name]
    assert w.input.low <= inputs.min() and inputs.max() <= w.input.high
    assert w.output.low <= outputs.min() and outputs.max() <= w.output.high


def test_clip_caps_lengths():
    trace = make_trace("summarization", 5.0, num_requests=500, max_input_tokens=2048, max_output_tokens=64)
    assert max(e.input_tokens for e in trace) == 2048
    assert max(e.output_tokens for e in trace) == 64


def test_rate_and_count():
    trace = make_trace("code", 4.0, duration_s=500, seed=2)
    assert len(trace) / 500 == pytest.approx(4.0, rel=0.08)
    assert len(make_trace("code", 4.0, num_requests=37)) == 37
    assert len(make_trace("code", 100.0, duration_s=10, num_requests=5)) == 5


def test_gamma_with_cv_above_one_is_burstier_than_poisson():
    poisson = make_trace("chat", 5.0, num_requests=20_000, seed=3)
    gamma = make_trace("chat", 5.0, num_requests=20_000, arrival="gamma", cv=3.0, seed=3)
    assert _cv(poisson) == pytest.approx(1.0, abs=0.05)
    assert _cv(gamma) == pytest.approx(3.0, rel=0.1)
    assert len(gamma) / gamma[-1].arrival_s == pytest.approx(5.0, rel=0.1)


def test_trace_file_round_trip_sorts(tmp_path):
    path = tmp_path / "t.jsonl"
    entries = make_trace("chat", 3.0, num_requests=50, seed=4)
    write_trace(str(path), entries)
    assert read_trace(str(path)) == entries
    path.write_text('{"arrival_s": 2, "input_tokens": 5, "output_tokens": 6}\n\n'
                    '{"arrival_s": 1.5, "input_tokens": 7, "output_tokens": 8, "note": "x"}\n')
    assert read_trace(str(path)) == [TraceEntry(1.5, 7, 8), TraceEntry(2.0, 5, 6)]


@pytest.mark.parametrize("line, field", [
    ('{"arrival_s": 1, "output_tokens": 3}', "input_tokens: missing"),
    ('{"arrival_s": -1, "input_tokens": 2, "output_tokens": 3}', "arrival_s"),
    ('{"arrival_s": 1, "input_tokens": 2.5, "output_tokens": 3}', "input_tokens"),
    ('{"arrival_s": 1, "input_tokens": 2, "output_tokens": -3}', "output_tokens"),
    ('{"arrival_s": 1, "input_tokens": 2, "output_tokens": true}', "output_tokens"),
    ('{"arrival_s": "1", "input_tokens": 2, "output_tokens": 3}', "arrival_s"),
    ("[1, 2, 3]", "JSON object"),
    ("{not json", "not JSON"),
])
def test_bad_trace_line_names_line_and_field(tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"arrival_s": 0, "input_tokens": 1, "output_tokens": 1}) + "\n\n" + line + "\n")
    with pytest.raises(TraceError, match="line 3") as info:
        read_trace(str(path))
    assert field in str(info.value)


def test_empty_trace_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(TraceError, match="no entries"):
        read_trace(str(path))


def test_phase_trace_orders_phases_in_time():
    chat, summ = WORKLOADS["chat"], WORKLOADS["summarization"]
    trace = phase_trace([Phase(chat, 100, 2.0), Phase(summ, 50, 4.0), Phase(chat, 100, 1.0)], seed=5)
    assert trace == phase_trace([Phase(chat, 100, 2.0), Phase(summ, 50, 4.0), Phase(chat, 100, 1.0)], seed=5)
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(trace, trace[1:]))
    middle = [e for e in trace if 100 <= e.arrival_s < 150]
    assert len(middle) / 50 == pytest.approx(4.0, rel=0.2)
    assert np.mean([e.input_tokens for e in middle]) > 2000
    assert np.mean([e.input_tokens for e in trace if e.arrival_s < 100]) < 600
    assert trace[-1].arrival_s < 250


def test_shift_is_chat_summarization_chat():
    trace = named_trace("shift", 3.0, duration_s=300, seed=6)
    thirds = [[e.input_tokens for e in trace if lo <= e.arrival_s < lo + 100] for lo in (0, 100, 200)]
    means = [np.mean(t) for t in thirds]
    assert means[1] > 2000 and means[0] < 600 and means[2] < 600
    by_count = named_trace("shift", 3.0, num_requests=3000, seed=6)
    assert len(by_count) == 3000
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(by_count, by_count[1:]))
    means = [np.mean([e.input_tokens for e in by_count[i:i + 1000]]) for i in (0, 1000, 2000)]
    assert means[1] > 2000 and means[0] < 600 and means[2] < 600


def test_scale_rate_divides_arrival_times():
    base = make_trace("chat", 1.0, num_requests=100, seed=9)
    faster = scale_rate(base, 4.0)
    assert [e.arrival_s for e in faster] == pytest.approx([e.arrival_s / 4 for e in base])
    assert [e.input_tokens for e in faster] == [e.input_tokens for e in base]
    # Gaps are drawn at rate 1, so a fresh trace at 4/s is the same requests, closer together.
    fresh = make_trace("chat", 4.0, num_requests=100, seed=9)
    assert [e.arrival_s for e in fresh] == pytest.approx([e.arrival_s for e in faster])
    with pytest.raises(TraceError, match="factor"):
        scale_rate(base, 0)


@pytest.mark.parametrize("kwargs, field", [
    ({"rate": 0, "duration_s": 1}, "rate"),
    ({"rate": 1}, "duration_s or num_requests"),
    ({"rate": 1, "duration_s": 1, "arrival": "uniform"}, "arrival"),
    ({"rate": 1, "duration_s": 1, "cv": -1}, "cv"),
    ({"rate": 1, "num_requests": 0}, "num_requests"),
])
def test_bad_parameters(kwargs, field):
    with pytest.raises(TraceError, match=field):
        make_trace("chat", **kwargs)
    with pytest.raises(TraceError, match="workload"):
        make_trace("poetry", 1.0, num_requests=1)


def test_phases_parse_and_scale_keeping_their_length():
    phases = parse_phases("chat:200:10, summarization:100:2")
    assert [(p.workload.name, p.duration_s, p.rate) for p in phases] == [("chat", 200, 10), ("summarization", 100, 2)]
    busier = scale_phases(phases, 3)
    assert [(p.duration_s, p.rate) for p in busier] == [(200, 30), (100, 6)]


@pytest.mark.parametrize("spec, words", [("chat:200", "workload:duration_s:rate"), ("chat:x:1", "numbers"),
                                         ("chat:10:0", "> 0"), ("poetry:10:1", "poetry")])
def test_bad_phase_spec_names_the_phase(spec, words):
    with pytest.raises(TraceError, match="phases\\[0\\]|workload") as info:
        parse_phases(spec)
    assert words in str(info.value)


def test_traffic_at_a_rate_multiple():
    phases = parse_phases("chat:50:4,summarization:50:2")
    phased = traffic_of(phases=phases, seed=3)
    base, busier = phased.at(1.0), phased.at(3.0)
    assert base == phased.at(1.0)  # regenerated from the same seed
    assert 2.4 < len(busier) / len(base) < 3.6  # three times the requests ...
    assert 45 < busier[-1].arrival_s <= 100 and 45 < base[-1].arrival_s <= 100  # ... over the same 100 s
    recorded = traffic_of(entries=base)
    assert recorded.at(1.0) == base
    assert [e.arrival_s for e in recorded.at(2.0)] == pytest.approx([e.arrival_s / 2 for e in base])
    with pytest.raises(ValueError):
        traffic_of(entries=base, phases=phases)
