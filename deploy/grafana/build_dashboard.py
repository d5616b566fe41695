"""Writes pdserve-dashboard.json beside this file: the Grafana dashboard for a pdserve cluster.

    python deploy/grafana/build_dashboard.py      # after editing a panel here; commit both files

The JSON is what Grafana imports; this script is its source, so that panels stay uniform and every PromQL query is
in one readable place. tests/unit/test_deploy.py checks that the JSON is this script's output and that every query
names only metrics that router/metrics.py and worker/metrics.py define.
"""

import json
import os

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pdserve-dashboard.json")

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
RI = "$__rate_interval"
panels = []
_id = [0]


def nid():
    _id[0] += 1
    return _id[0]


def target(expr, legend, ref):
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def ts(title, desc, exprs, x, y, w=12, h=8, unit="short", overrides=(), stack=False):
    """A time series panel; `exprs` is [(PromQL, legend)]."""
    refs = "ABCDEFGHIJ"
    return {
        "id": nid(), "type": "timeseries", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "targets": [target(expr, legend, refs[i]) for i, (expr, legend) in enumerate(exprs)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                           "showPoints": "never", "spanNulls": False,
                           "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
                "color": {"mode": "palette-classic"},
            },
            "overrides": list(overrides),
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def stat(title, desc, expr, x, y, unit="short", w=4, decimals=None):
    p = {
        "id": nid(), "type": "stat", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"h": 4, "w": w, "x": x, "y": y},
        "targets": [target(expr, "", "A") | {"instant": True, "range": False}],
        "fieldConfig": {"defaults": {"unit": unit, "color": {"mode": "thresholds"},
                                     "thresholds": {"mode": "absolute",
                                                    "steps": [{"color": "green", "value": None}]}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto", "justifyMode": "auto"},
    }
    if decimals is not None:
        p["fieldConfig"]["defaults"]["decimals"] = decimals
    return p


def row(title, y):
    return {"id": nid(), "type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}


def slo_line(name):
    """An override drawing the SLO series as a dashed red line."""
    return {"matcher": {"id": "byName", "options": name},
            "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                           {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                           {"id": "custom.lineWidth", "value": 2}]}


def quantiles(metric):
    """p50/p90/p99 of a histogram over every instance."""
    return [(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[{RI}])))", f"p{int(q * 100)}")
            for q in (0.5, 0.9, 0.99)]


y = 0
panels.append(row("Overview", y))
y += 1
finished = f'sum(rate(pdserve_requests_total{{outcome=~"stop|length"}}[{RI}]))'
panels += [
    stat("Finished requests/s", "Requests that ended with a finish reason (stop or length), per second.",
         finished, 0, y, "reqps", decimals=2),
    stat("TTFT p90", "90th percentile time to first token at the client.",
         f"histogram_quantile(0.9, sum by (le) (rate(pdserve_time_to_first_token_seconds_bucket[{RI}])))",
         4, y, "s"),
    stat("TPOT p90", "90th percentile time per output token after the first.",
         f"histogram_quantile(0.9, sum by (le) (rate(pdserve_time_per_output_token_seconds_bucket[{RI}])))",
         8, y, "s"),
    stat("In flight", "Requests accepted by the router and not yet ended.", "sum(pdserve_requests_in_flight)",
         12, y),
    stat("Waiting for room", "Requests accepted but not yet sent to a worker (choosing one, or waiting for free KV "
         "blocks on a decode worker). Past router.max_waiting new requests are refused.",
         "sum(pdserve_requests_waiting_for_room)", 16, y),
    stat("Failed requests/s", "Requests that ended without a finish reason (invalid, overloaded, unavailable, error; "
         "not counting cancelled).",
         f'sum(rate(pdserve_requests_total{{outcome=~"invalid|duplicate|overloaded|unavailable|error"}}[{RI}]))',
         20, y, "reqps", decimals=2),
]
y += 4

panels.append(row("Latency against the SLOs", y))
y += 1
panels += [
    ts("Time to first token (TTFT)", "Accepted at the router to first token sent to the client: queueing, prefill "
       "and the KV handoff. Dashed red: the SLO chosen in the slo_ttft variable (set it to your slo.ttft_s).",
       quantiles("pdserve_time_to_first_token_seconds") + [("vector($slo_ttft)", "SLO")], 0, y, unit="s",
       overrides=[slo_line("SLO")]),
    ts("Time per output token (TPOT)", "Per request: (last token - first token) / (tokens - 1), requests of 2+ "
       "tokens. Dashed red: the SLO chosen in the slo_tpot variable (set it to your slo.tpot_s).",
       quantiles("pdserve_time_per_output_token_seconds") + [("vector($slo_tpot)", "SLO")], 12, y, unit="s",
       overrides=[slo_line("SLO")]),
]
y += 8
ttft_ok = (f'sum(rate(pdserve_time_to_first_token_seconds_bucket{{le="$slo_ttft"}}[{RI}]))')
tpot_ok = (f'sum(rate(pdserve_time_per_output_token_seconds_bucket{{le="$slo_tpot"}}[{RI}]))')
panels += [
    ts("SLO attainment", "Share of requests within each SLO, read off the histograms' bucket at the SLO (so the "
       "SLO variables must be bucket bounds). The ratio controller and `pdserve bench` aim at >= 90% within both.",
       [(f"{ttft_ok} / sum(rate(pdserve_time_to_first_token_seconds_count[{RI}]))", "within TTFT SLO"),
        (f"{tpot_ok} / sum(rate(pdserve_time_per_output_token_seconds_count[{RI}]))", "within TPOT SLO")],
       0, y, unit="percentunit"),
    ts("Goodput bounds", "Requests/s within each SLO. Goodput (requests/s within both) is at most the lower of the "
       "two lines; the histograms do not say which requests met both, `pdserve bench` measures that per request.",
       [(f"{ttft_ok}", "within TTFT SLO"), (f"{tpot_ok}", "within TPOT SLO"), (finished, "finished")],
       12, y, unit="reqps"),
]
y += 8
panels += [
    ts("Where TTFT goes (p90)", "90th percentiles of the parts of a request's first token: waiting (router and "
       "worker queue), the prefill itself, and the KV handoff from the prefill to the decode worker.",
       [(f"histogram_quantile(0.9, sum by (le) (rate(pdserve_request_queue_time_seconds_bucket[{RI}])))", "queue"),
        (f"histogram_quantile(0.9, sum by (le) (rate(pdserve_request_prefill_time_seconds_bucket[{RI}])))",
         "prefill"),
        (f"histogram_quantile(0.9, sum by (le) (rate(pdserve_request_kv_transfer_time_seconds_bucket[{RI}])))",
         "KV transfer")], 0, y, unit="s"),
    ts("End-to-end latency and inter-token gaps", "Accepted to finished (p50/p90/p99), and the p99 gap between two "
       "consecutive responses carrying tokens to one client (stalls show here first).",
       quantiles("pdserve_e2e_request_latency_seconds")
       + [(f"histogram_quantile(0.99, sum by (le) (rate(pdserve_inter_token_latency_seconds_bucket[{RI}])))",
           "inter-token p99")], 12, y, unit="s"),
]
y += 8

panels.append(row("Traffic", y))
y += 1
panels += [
    ts("Requests by outcome", "Requests ended per second, by how they ended: a finish reason (stop, length, abort) "
       "or the error kind (invalid, duplicate, overloaded, unavailable, cancelled, error).",
       [(f"sum by (outcome) (rate(pdserve_requests_total[{RI}]))", "{{outcome}}")], 0, y, unit="reqps", stack=True),
    ts("Requests in flight and waiting", "In flight: accepted and not yet ended. Waiting for room: not yet sent to a "
       "worker (a decode worker with free KV blocks).",
       [("sum(pdserve_requests_in_flight)", "in flight"), ("sum(pdserve_requests_waiting_for_room)",
                                                           "waiting for room")], 12, y),
]
y += 8
panels += [
    ts("Migrations", "Requests resumed on other workers after their worker failed (prompt plus the tokens already "
       "sent, prefilled again), per second.",
       [(f"sum(rate(pdserve_request_migrations_total[{RI}]))", "migrations/s")], 0, y, unit="reqps"),
    ts("Tokens per second (router)", "Prompt and generated tokens of finished requests, per second.",
       [(f"sum(rate(pdserve_request_prompt_tokens_sum[{RI}]))", "prompt"),
        (f"sum(rate(pdserve_request_generation_tokens_sum[{RI}]))", "generated")], 12, y),
]
y += 8

panels.append(row("Workers (each worker's /metrics)", y))
y += 1
panels += [
    ts("Workers by role", "Workers in the registry by role and state (from the routers), and the workers held on "
       "average (the rate of worker-seconds: what the fleet pays for). The ratio controller changes these: a move "
       "drains a worker and switches it to the other role, an add starts one, a remove drains and stops one "
       "(`pdserve status` shows each decision's reason).",
       [("max by (role, state) (pdserve_workers)", "{{role}} {{state}}"),
        (f"sum(max by (role) (rate(pdserve_worker_seconds_total[{RI}])))", "held (avg)")], 0, y, w=8),
    ts("KV blocks used per worker", "KV cache blocks in use on each worker.",
       [("sum by (worker_id, role) (pdserve_worker_kv_blocks_used)", "{{worker_id}} ({{role}})")], 8, y, w=8),
    ts("KV cache used per worker", "Share of each worker's KV blocks in use. Decode workers near 100% make new "
       "requests wait for room.",
       [("sum by (worker_id, role) (pdserve_worker_kv_blocks_used) / sum by (worker_id, role) "
         "(pdserve_worker_kv_blocks_total)", "{{worker_id}} ({{role}})")], 16, y, w=8, unit="percentunit"),
]
y += 8
panels += [
    ts("Worker queues by role", "Requests running, waiting for their first step, and held (prefilled and waiting "
       "for the handoff, or reserved for KV arriving), summed per role.",
       [("sum by (role) (pdserve_worker_requests_running)", "running {{role}}"),
        ("sum by (role) (pdserve_worker_requests_waiting)", "waiting {{role}}"),
        ("sum by (role) (pdserve_worker_requests_held)", "held {{role}}")], 0, y),
    ts("Engine throughput by role", "Prompt tokens computed and tokens decoded per second, and the prompt tokens "
       "still queued.",
       [(f"sum by (role) (rate(pdserve_worker_prefill_tokens_total[{RI}]))", "prefill tok/s {{role}}"),
        (f"sum by (role) (rate(pdserve_worker_decode_tokens_total[{RI}]))", "decode tok/s {{role}}"),
        ("sum by (role) (pdserve_worker_queued_prefill_tokens)", "queued prefill tokens {{role}}")], 12, y),
]
y += 8
panels += [
    ts("KV transfers by status", "KV handoffs ended per second: done, failed, cancelled (an aborted request's KV, "
       "drained), timed_out.",
       [(f"sum by (status) (rate(pdserve_worker_kv_transfers_total[{RI}]))", "{{status}}")], 0, y, unit="ops"),
    ts("KV transfer time and bandwidth", "p50/p90 of a handoff that moved KV (start to done), and the bytes moved per "
       "second (counted on both ends).",
       [(f"histogram_quantile(0.5, sum by (le) (rate(pdserve_worker_kv_transfer_seconds_bucket[{RI}])))", "p50"),
        (f"histogram_quantile(0.9, sum by (le) (rate(pdserve_worker_kv_transfer_seconds_bucket[{RI}])))", "p90"),
        (f"sum(rate(pdserve_worker_kv_transfer_bytes_total[{RI}]))", "bytes/s")], 12, y, unit="s",
       overrides=[{"matcher": {"id": "byName", "options": "bytes/s"},
                   "properties": [{"id": "unit", "value": "Bps"}, {"id": "custom.axisPlacement", "value": "right"}]}]),
]
y += 8
panels += [
    ts("Batch size and step time", "Requests per engine step (p50, p90) and the p90 step duration, by role.",
       [(f"histogram_quantile(0.5, sum by (le, role) (rate(pdserve_worker_step_requests_bucket[{RI}])))",
         "batch p50 {{role}}"),
        (f"histogram_quantile(0.9, sum by (le, role) (rate(pdserve_worker_step_requests_bucket[{RI}])))",
         "batch p90 {{role}}"),
        (f"histogram_quantile(0.9, sum by (le, role) (rate(pdserve_worker_step_seconds_bucket[{RI}])))",
         "step p90 {{role}}")], 0, y,
       overrides=[{"matcher": {"id": "byRegexp", "options": "step p90.*"},
                   "properties": [{"id": "unit", "value": "s"}, {"id": "custom.axisPlacement", "value": "right"}]}]),
    ts("Preemptions and utilization", "Requests preempted per second (KV ran out; recomputed later), and MFU/MBU of "
       "simulated engines (a torch engine has no known peak: no samples).",
       [(f"sum by (role) (rate(pdserve_worker_preemptions_total[{RI}]))", "preemptions/s {{role}}"),
        ("avg by (role) (pdserve_worker_mfu)", "MFU {{role}}"),
        ("avg by (role) (pdserve_worker_mbu)", "MBU {{role}}")], 12, y),
]
y += 8
panels += [
    ts("Speculative decoding", "Share of proposed tokens accepted, and tokens a speculative step emits (accepted "
       "proposals plus the model's own), by method.",
       [(f"sum by (method) (rate(pdserve_worker_speculative_accepted_tokens_total[{RI}])) / sum by (method) "
         f"(rate(pdserve_worker_speculative_proposed_tokens_total[{RI}]))", "accepted {{method}}"),
        (f"1 + sum by (method) (rate(pdserve_worker_speculative_accepted_tokens_total[{RI}])) / sum by (method) "
         f"(rate(pdserve_worker_speculative_steps_total[{RI}]))", "tokens/step {{method}}")], 0, y),
]
y += 8


def custom(name, label, values, default, desc):
    return {
        "name": name, "label": label, "type": "custom", "description": desc, "query": ",".join(values),
        "current": {"selected": True, "text": default, "value": default},
        "options": [{"selected": v == default, "text": v, "value": v} for v in values],
        "hide": 0, "multi": False, "includeAll": False, "skipUrlSync": False,
    }


dashboard = {
    "title": "pdserve",
    "uid": "pdserve-overview",
    "description": "pdserve: latency against the SLOs, traffic, and the prefill/decode workers. Metric names: "
                   "router/metrics.py and worker/metrics.py.",
    "tags": ["pdserve", "llm-serving"],
    "editable": True,
    "graphTooltip": 1,
    "time": {"from": "now-30m", "to": "now"},
    "refresh": "10s",
    "schemaVersion": 39,
    "version": 1,
    "timezone": "",
    "fiscalYearStartMonth": 0,
    "liveNow": False,
    "links": [],
    "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                              "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                              "name": "Annotations & Alerts", "type": "dashboard"}]},
    "templating": {"list": [
        {"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1, "regex": "",
         "skipUrlSync": False},
        custom("slo_ttft", "TTFT SLO (s)",
               ["0.1", "0.2", "0.3", "0.5", "0.75", "1.0", "1.5", "2.0", "3.0", "5.0", "7.5", "10.0"], "2.0",
               "Your cluster's slo.ttft_s. Must be a histogram bucket bound (the `le` label), as listed."),
        custom("slo_tpot", "TPOT SLO (s)",
               ["0.01", "0.015", "0.02", "0.03", "0.05", "0.075", "0.1", "0.15", "0.2", "0.3", "0.5"], "0.2",
               "Your cluster's slo.tpot_s. Must be a histogram bucket bound (the `le` label), as listed."),
    ]},
    "panels": panels,
}


def render() -> str:
    return json.dumps(dashboard, indent=2) + "\n"


if __name__ == "__main__":
    with open(OUT, "w") as f:
        f.write(render())
    print(f"{OUT}: {len(panels)} panels")
