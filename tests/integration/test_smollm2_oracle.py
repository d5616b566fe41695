"""Greedy output of the engine on the real SmolLM2 is token-identical to transformers on the same GGUF."""

import numpy as np
import pytest
import torch

from pdserve.engine import FinishReason, Message, Prompt, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0)

LONG_TEXT = ("Summarise the following notes. " + " ".join(
    f"Note {i}: the meeting on day {i} covered budgets, hiring plans for the data team, and the migration of "
    f"service number {i * 7} to the new cluster, which was delayed by storage issues." for i in range(30)))

PROMPTS = [
    Prompt(messages=(Message("user", "What is the capital of France?"),)),
    Prompt(text="The quick brown fox"),
    Prompt(messages=(Message("system", "You answer in one word."), Message("user", "Name a colour of the sky."))),
    Prompt(messages=(Message("user", LONG_TEXT),)),
    Prompt(text="def fibonacci(n):"),
    Prompt(messages=(Message("user", "Write a haiku about the sea."),)),
]


def test_long_prompt_needs_chunking(engine):
    assert len(engine.tokenize(PROMPTS[3])) > 700 > engine.config.max_num_batched_tokens


def test_mixed_batch_matches_transformers(engine, reference_greedy):
    outputs = engine.generate(PROMPTS, GREEDY)
    for prompt, output in zip(PROMPTS, outputs):
        assert list(output.token_ids) == reference_greedy(list(output.prompt_token_ids), 24), prompt
    assert engine.blocks.num_used == 0


def test_requests_joining_mid_decode_match_transformers(engine, reference_greedy):
    first = ["a", "b"]
    later = ["c", "d", "e"]
    prompts = dict(zip(first + later, [PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[4], PROMPTS[5]]))
    for rid in first:
        engine.add_request(rid, prompts[rid], GREEDY)
    final = {}
    for step in range(200):
        if step == 4:  # a and b are decoding now
            for rid in later:
                engine.add_request(rid, prompts[rid], GREEDY)
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
        if len(final) == 5:
            break
    assert sorted(final) == first + later
    for rid, output in final.items():
        assert list(output.token_ids) == reference_greedy(list(output.prompt_token_ids), 24), rid
    assert engine.blocks.num_used == 0


def test_text_and_finish_reasons(engine):
    capital, fox = engine.generate(PROMPTS[:2], GREEDY)
    assert capital.finish_reason is FinishReason.STOP and capital.token_ids[-1] in engine.eos_token_ids
    assert "Paris" in capital.text and "<|im_end|>" not in capital.text
    assert fox.finish_reason is FinishReason.LENGTH and len(fox.token_ids) == 24
    assert fox.text == engine.tokenizer.decode(fox.token_ids)


def test_stop_string_cuts_text(engine):
    [out] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0, stop=("Paris",)))
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == "Paris"
    assert "Paris" not in out.text and out.text.startswith("The capital")


def test_gguf_weights_match_transformers_dequantization(gguf_path, reference):
    """Our GGUF reader (dequantize + q/k un-permute) gives exactly the tensors transformers loads."""
    from gguf import GGUFReader

    from pdserve.engine.gguf_weights import read_config, read_tensors

    reader = GGUFReader(gguf_path)
    ours = dict(read_tensors(reader, read_config(reader)))
    theirs = reference.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight"):
        np.testing.assert_array_equal(ours[name].numpy(), theirs[name].numpy(), err_msg=name)
    assert torch.equal(ours["model.norm.weight"], theirs["model.norm.weight"])


@pytest.mark.parametrize("seed", [7, 123])
def test_seeded_sampling_is_reproducible(engine, seed):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=seed)
    alone = engine.generate([PROMPTS[5]], params)[0]
    batched = engine.generate([PROMPTS[1], PROMPTS[5], PROMPTS[0]], [GREEDY, params, GREEDY])[1]
    assert alone.token_ids == batched.token_ids
