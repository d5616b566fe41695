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


def test_cuda_paged_kernels_and_graphs_match_the_torch_path():
    """The Triton kernels with CUDA graphs give the same greedy tokens as the torch attention path (fp32)."""
    prompts = [list(range(1000, 1000 + n)) for n in (3, 40, 130)]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outputs = {}
    for attention in ("torch", "triton"):
        gpu = Engine(EngineConfig(model="random:smollm2-135m", device="cuda", attention=attention, num_kv_blocks=256,
                                  max_num_batched_tokens=64))
        assert (gpu.runner.graphs is not None) == (attention == "triton")
        outputs[attention] = [o.token_ids for o in gpu.generate(prompts, greedy)]
        assert gpu.blocks.num_used == 0
    assert outputs["triton"] == outputs["torch"]


def test_cuda_quantised_llama3_8b_decodes():
    for method in ("int8", "int4", "w8a8"):
        gpu = Engine(EngineConfig(model="random:llama-3-8b", device="cuda", dtype="bf16", num_kv_blocks=256,
                                  quantization=method))
        [out] = gpu.generate([list(range(1000, 1100))], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        assert len(out.token_ids) == 8
        del gpu
        torch.cuda.empty_cache()
