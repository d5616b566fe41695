"""The same model code on CUDA: greedy tokens equal the CPU run. Skipped where there is no GPU (CI has none)."""

import pytest
import torch

from pdserve.engine import Engine, EngineConfig, SamplingParams

from .test_smollm2_oracle import GREEDY, PROMPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_greedy_matches_cpu(engine):
    gpu = Engine(EngineConfig(device="cuda", max_num_batched_tokens=256, num_kv_blocks=512))
    assert gpu.kv_cache.tensor.is_cuda
    cpu_out = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    gpu_out = [o.token_ids for o in gpu.generate(PROMPTS, GREEDY)]
    assert gpu_out == cpu_out
    assert gpu.blocks.num_used == 0


def test_cuda_bf16_random_llama3_8b_decodes():
    gpu = Engine(EngineConfig(model="random:llama-3-8b", device="cuda", dtype="bf16", num_kv_blocks=256))
    [out] = gpu.generate([list(range(1000, 1100))], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 8
