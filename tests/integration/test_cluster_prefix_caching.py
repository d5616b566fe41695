"""Prefix caching on the shared basic cluster (SmolLM2, a prefill and a decode worker, prefix caching and KV-aware
routing on by default): a conversation's second turn is served from the caches of both workers, the decode worker
receives only the blocks it lacks (the workers' byte counters), usage reports the cached tokens, `pdserve status`
shows the hit rate, greedy tokens equal transformers', and once idle no block is held."""

import json
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.engine import Message, Prompt

pytestmark = pytest.mark.model

SYSTEM = "You are a museum guide. " + " ".join(f"Fact {i}: room {i} holds paintings from the year {1500 + 7 * i}."
                                              for i in range(25))
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(basic_cluster):
    yield basic_cluster
    workers = basic_cluster.wait_until_idle()  # the fixture is shared: leave it as we found it
    assert all(w["used"] == 0 and w["running"] == 0 for w in workers.values()), workers


def chat(cluster, messages: list[dict]) -> dict:
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
    request = urllib.request.Request(f"{cluster.http_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def worker_counter(cluster, name: str, role: str) -> float:
    url = cluster.http_url.removesuffix("/v1") + "/metrics/workers"
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and s.labels.get("role") == role)


def test_a_second_turn_comes_from_the_caches_and_matches_transformers(cluster, engine, reference_greedy):
    first_turn = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which room is the oldest?"}]
    first = chat(cluster, first_turn)
    not_sent = worker_counter(cluster, "pdserve_worker_kv_bytes_not_sent_total", "prefill")
    received = worker_counter(cluster, "pdserve_worker_kv_transfer_bytes_total", "decode")
    second_turn = first_turn + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                                {"role": "user", "content": "And the newest?"}]
    second = chat(cluster, second_turn)

    ids = engine.tokenize(Prompt(messages=tuple(Message(m["role"], m["content"]) for m in second_turn)))
    assert second["usage"]["prompt_tokens"] == len(ids)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= len(engine.tokenize(Prompt(messages=tuple(Message(m["role"], m["content"])
                                                               for m in first_turn)))) - 2 * 16
    assert second["choices"][0]["token_ids"] == reference_greedy(ids, MAX_TOKENS)
    # The decode worker held the first turn's blocks: only the rest crossed, and the prefill worker counted the rest.
    skipped = worker_counter(cluster, "pdserve_worker_kv_bytes_not_sent_total", "prefill") - not_sent
    moved = worker_counter(cluster, "pdserve_worker_kv_transfer_bytes_total", "decode") - received
    assert skipped > 0 and moved > 0 and skipped > 2 * moved
    assert hit_rates_shown(cluster)


def hit_rates_shown(cluster, timeout_s: float = 10.0) -> bool:
    """`pdserve status` shows every worker's hit rate above 0 (heartbeats lag by up to a second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = json.loads(cluster.pdserve("status", "--json").stdout)
        if all(w["prefix_cache_hit_rate"] > 0 for w in status["workers"]):
            return True
        time.sleep(0.5)
    return False
