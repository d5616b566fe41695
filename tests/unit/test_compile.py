"""`engine.compile`: on the torch attention path decode-only steps run as one compiled graph
(`engine.compiled_decode`); greedy tokens stay transformers', and the KV it writes is what eager steps write."""

import dataclasses

import torch
from torch._dynamo.utils import counters

from pdserve.engine import Engine, EngineConfig, SamplingParams
from pdserve.engine.compiled_decode import CompiledDecode, past_and_new_mask

from .test_model_vs_transformers import CASES, _greedy, _reference


def test_compiled_engine_matches_transformers(tmp_path, monkeypatch):
    reference = _reference(CASES["llama-untied"], tmp_path)
    engine = Engine(EngineConfig(model=str(tmp_path), compile=True, max_num_batched_tokens=48, num_kv_blocks=64,
                                 block_size=8))
    assert isinstance(engine.runner.graphs, CompiledDecode)
    compiled_before = dict(counters["stats"])  # the engine compiled both graphs before its first request
    batches = []
    run = CompiledDecode.run
    monkeypatch.setattr(CompiledDecode, "run", lambda self, chunks: batches.append(len(chunks)) or run(self, chunks))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 130, 1, 37)]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        assert list(output.token_ids) == _greedy(reference, prompt, 12)
    assert engine.blocks.num_used == 0
    assert 1 in batches and max(batches) == 4  # the batch-of-one graph and the larger one both served steps
    assert dict(counters["stats"]) == compiled_before  # and no step compiled anything


def test_compiled_decode_writes_the_kv_and_tokens_of_eager_steps(tmp_path):
    """Quantised (w8a8), mixed lengths, contexts crossing block boundaries, in lockstep with an eager engine: after
    every step the whole KV cache agrees and the same tokens come out."""
    _reference(CASES["llama-untied"], tmp_path)
    config = EngineConfig(model=str(tmp_path), quantization="w8a8", max_num_batched_tokens=64, num_kv_blocks=64,
                          block_size=8, prefix_caching=False)
    eager, compiled = Engine(config), Engine(dataclasses.replace(config, compile=True))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 15, 30)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for engine in (eager, compiled):
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
    steps = 0
    while eager.has_unfinished():
        got = [(o.request_id, list(o.token_ids)) for o in compiled.step()]
        want = [(o.request_id, list(o.token_ids)) for o in eager.step()]
        assert got == want
        assert torch.allclose(compiled.kv_cache.tensor, eager.kv_cache.tensor, atol=1e-5)
        steps += 1
    assert steps >= 12 and not compiled.has_unfinished()
    assert eager.blocks.num_used == compiled.blocks.num_used == 0


def test_the_new_token_sees_its_past_and_itself_only():
    mask = past_and_new_mask(torch.tensor([0, 3]), past_slots=4, dtype=torch.float32)  # [2, 1, 1, 5]
    visible = (mask[:, 0, 0] == 0).tolist()
    assert visible == [[False, False, False, False, True], [True, True, True, False, True]]


def test_a_second_engine_shares_the_graphs_and_keeps_its_own_weights_and_cache(tmp_path):
    """Two compiled engines of one shape in a process: the second compiles nothing (torch.compile's cache serves
    it), yet its graph reads its own cache, not the first's: stepped in turn with the first on other prompts, its
    whole KV cache equals an eager engine's after every step."""
    _reference(CASES["llama-untied"], tmp_path)
    config = EngineConfig(model=str(tmp_path), num_kv_blocks=64, block_size=8, prefix_caching=False)
    first = Engine(dataclasses.replace(config, compile=True))
    compiled_before = dict(counters["stats"])
    second, eager = Engine(dataclasses.replace(config, compile=True)), Engine(config)
    assert dict(counters["stats"]) == compiled_before
    gen = torch.Generator().manual_seed(5)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for i, n in enumerate((7, 20)):
        first.add_request(f"a{i}", torch.randint(0, 256, (n,), generator=gen).tolist(), params)
    for i, n in enumerate((9, 33)):
        prompt = torch.randint(0, 256, (n,), generator=gen).tolist()
        second.add_request(f"b{i}", prompt, params)
        eager.add_request(f"b{i}", prompt, params)
    while eager.has_unfinished():
        first.step()
        got = [(o.request_id, list(o.token_ids)) for o in second.step()]
        assert got == [(o.request_id, list(o.token_ids)) for o in eager.step()]
        assert torch.allclose(second.kv_cache.tensor, eager.kv_cache.tensor, atol=1e-5)
    assert not second.has_unfinished()
