"""Other dtypes and random weights of named real shapes (the speed-work path)."""

import pytest
import torch

from pdserve.engine import Engine, EngineConfig, FinishReason, Message, Prompt, SamplingParams
from pdserve.engine.shapes import SHAPES


@pytest.mark.parametrize(("name", "billions"), [("llama-3-8b", 8.03), ("llama-2-7b", 6.74), ("llama-3-70b", 70.6),
                                                 ("smollm2-135m", 0.135)])
def test_named_shapes_have_the_published_parameter_counts(name, billions):
    assert SHAPES[name].num_parameters() / 1e9 == pytest.approx(billions, rel=0.01)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_random_weights_run_in_half_precision(dtype):
    engine = Engine(EngineConfig(model="random:smollm2-135m", dtype=dtype, num_kv_blocks=32))
    assert engine.kv_cache.tensor.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    [out] = engine.generate([list(range(10, 60))], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 6 and all(0 <= t < 49152 for t in out.token_ids)
    assert out.text == "" and engine.blocks.num_used == 0  # random weights come without a tokenizer


def test_random_weights_need_token_ids():
    engine = Engine(EngineConfig(model="random:smollm2-135m", num_kv_blocks=8))
    with pytest.raises(ValueError, match="token_ids"):
        engine.add_request("r", Prompt(text="hello"), SamplingParams())


def test_smollm2_bf16_still_answers():
    engine = Engine(EngineConfig(dtype="bf16", num_kv_blocks=64))
    [out] = engine.generate([Prompt(messages=(Message("user", "What is the capital of France?"),))],
                            SamplingParams(max_tokens=16, temperature=0))
    assert "Paris" in out.text and out.finish_reason is FinishReason.STOP
