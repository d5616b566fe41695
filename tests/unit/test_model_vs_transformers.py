"""Our model against transformers' own Llama and Qwen2, with the same small random weights.

The weights go through a real Hugging Face folder (save_pretrained -> config.json + safetensors), so the loader's
name mapping, fusing and transposing are covered too. Checks logits closeness and greedy token identity, through
the whole engine (paged KV, chunked prefill, batched decode).
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pdserve.engine import Engine, EngineConfig, SamplingParams

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}

CASES = {
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True)),
    "llama-untied": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)),
    "llama3-rope-scaling": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters=LLAMA3_ROPE)),
    "qwen2-bias": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)),
}


def _reference(make, folder) -> torch.nn.Module:
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():  # larger weights than the default init, so logits are far from uniform
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:  # norm weights
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers(case, tmp_path):
    reference = _reference(CASES[case], tmp_path)
    engine = Engine(EngineConfig(model=str(tmp_path), max_num_batched_tokens=48, num_kv_blocks=64, block_size=8))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 130, 1, 37)]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        assert list(output.token_ids) == _greedy(reference, prompt, 12)
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_logits_close_to_transformers(case, tmp_path):
    reference = _reference(CASES[case], tmp_path)
    engine = Engine(EngineConfig(model=str(tmp_path), max_num_batched_tokens=64, num_kv_blocks=64, block_size=8))
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0, -1]
    engine.add_request("r", prompt, SamplingParams(max_tokens=1, temperature=0))
    chunks = engine.scheduler.schedule().chunks
    step = engine.runner.prepare(chunks)
    with torch.inference_mode():
        hidden = engine.model(step.input_ids, step.positions, engine.kv_cache, step.meta)
        ours = engine.model.logits(hidden[step.sample_rows])[0]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
