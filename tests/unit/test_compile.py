"""`engine.compile`: the compiled decoder layers give transformers' greedy tokens, as the eager ones do."""

import torch

from pdserve.engine import Engine, EngineConfig, SamplingParams

from .test_model_vs_transformers import CASES, _greedy, _reference


def test_compiled_engine_matches_transformers(tmp_path):
    reference = _reference(CASES["llama-untied"], tmp_path)
    engine = Engine(EngineConfig(model=str(tmp_path), compile=True, max_num_batched_tokens=48, num_kv_blocks=64,
                                 block_size=8))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 130, 1, 37)]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        assert list(output.token_ids) == _greedy(reference, prompt, 12)
    assert engine.blocks.num_used == 0
