"""int8/int4 (weight-only) and w8a8 layers against their fp32 originals, and the engine serving quantised models."""

import pytest
import torch

from pdserve.engine import Engine, EngineConfig, SamplingParams, quantization
from pdserve.engine.model import Linear
from pdserve.engine.quantization import (
    DEQUANTIZE_ROWS,
    INT4_GROUP,
    Int4Linear,
    Int8Linear,
    Quantization,
    W8A8Linear,
    _unpack_cpu_int4,
    quantize_model,
    weight_bytes,
)

from .test_model_vs_transformers import CASES, _reference


def linear(in_features: int, out_features: int, bias: bool = False) -> Linear:
    gen = torch.Generator().manual_seed(in_features + out_features)
    layer = Linear(in_features, out_features, bias=bias)
    layer.weight.data = torch.randn(in_features, out_features, generator=gen) * 0.05
    if bias:
        layer.bias.data = torch.randn(out_features, generator=gen)
    return layer


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("kind, bound", [(Int8Linear, 0.01), (Int4Linear, 0.12), (W8A8Linear, 0.02)])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_quantised_linear_is_close_to_fp32(kind, bound, rows):
    dense = linear(256, 96, bias=True)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    want = dense(x)
    got = kind(dense.weight.data, dense.bias)(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert relative_error(got, want) < bound


def test_int4_is_coarser_than_int8_and_both_beat_noise():
    dense = linear(512, 64)
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(0))
    want = dense(x)
    err8 = relative_error(Int8Linear(dense.weight.data, None)(x), want)
    err4 = relative_error(Int4Linear(dense.weight.data, None)(x), want)
    assert err8 < err4 < 0.12


def test_int4_rejects_input_sizes_off_the_group():
    with pytest.raises(ValueError, match=f"divisible by {INT4_GROUP}"):
        Int4Linear(torch.randn(INT4_GROUP + 8, 16), None)


@pytest.mark.parametrize("method, kind, shrink", [(Quantization.INT8, Int8Linear, 3.5),
                                                  (Quantization.INT4, Int4Linear, 5),
                                                  (Quantization.W8A8, W8A8Linear, 3.5)])
def test_quantize_model_replaces_every_linear_and_shrinks_it(tmp_path, method, kind, shrink):
    _reference(CASES["llama-untied"], tmp_path)
    fp32 = Engine(EngineConfig(model=str(tmp_path), num_kv_blocks=8)).model
    linear_bytes = sum(weight_bytes(layer.attn) + weight_bytes(layer.mlp) for layer in fp32.layers)
    quantize_model(fp32, method)
    for layer in fp32.layers:
        assert all(isinstance(m, kind) for m in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down))
    assert isinstance(fp32.lm_head, W8A8Linear if method is Quantization.W8A8 else Int8Linear)
    quantised_bytes = sum(weight_bytes(layer.attn) + weight_bytes(layer.mlp) for layer in fp32.layers)
    assert linear_bytes / quantised_bytes > shrink


@pytest.mark.parametrize("case", ["llama-untied", "qwen2-bias"])
@pytest.mark.parametrize("method", ["int8", "int4", "w8a8"])
def test_quantised_engine_follows_the_fp32_model(tmp_path, case, method):
    """Same prompts through fp32 and quantised engines: the first token's logits agree closely, generation runs
    to length through chunked prefill and batched decode, and every block comes back."""
    _reference(CASES[case], tmp_path)
    config = EngineConfig(model=str(tmp_path), max_num_batched_tokens=48, num_kv_blocks=64, block_size=8)
    fp32 = Engine(config)
    quantised = Engine(EngineConfig(**{**config.__dict__, "quantization": method}))
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    hidden = [e.model(torch.tensor(prompt), torch.arange(len(prompt)), e.kv_cache, e.runner.prepare(
        _one_chunk(e, prompt)).meta)[-1:] for e in (fp32, quantised)]
    logits = [e.model.logits(h) for e, h in zip((fp32, quantised), hidden)]
    cosine = torch.nn.functional.cosine_similarity(logits[0], logits[1]).item()
    assert cosine > {"int8": 0.999, "w8a8": 0.995, "int4": 0.9}[method]  # random weights: int4 at its worst here
    prompts = [prompt, prompt[:5], prompt[:1]]
    outputs = quantised.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outputs] == [10, 10, 10]
    assert quantised.blocks.num_used == 0


def _one_chunk(engine: Engine, prompt: list[int]):
    """The scheduler's chunk for a fresh prompt of fewer tokens than a step's budget (allocates its blocks)."""
    engine.add_request("probe", prompt, SamplingParams(max_tokens=1))
    [chunk] = engine.scheduler.schedule().chunks
    return (chunk,)


@pytest.mark.parametrize("rows", [64, 576, 960])
def test_cpu_int4_layout_unpacks_to_the_values_packed(rows):
    q = torch.randint(0, 16, (rows, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(rows))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(_unpack_cpu_int4(packed).int(), q)


@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
def test_long_steps_dequantise_and_agree_with_the_packed_kernel(kind):
    """Prefill-sized inputs take the dense path on the dequantised weight; it matches row-by-row packed results
    (up to the packed kernels' bf16 activations)."""
    layer = kind(linear(256, 192).weight.data, None)
    x = torch.randn(DEQUANTIZE_ROWS + 16, 256, generator=torch.Generator().manual_seed(5))
    dense = layer(x)
    packed = torch.cat([layer(x[i:i + 16]) for i in range(0, x.shape[0], 16)])
    assert relative_error(dense, packed) < 0.01


def test_w8a8_scales_each_row_on_its_own():
    """A row of large values next to a row of small ones: per-row activation scales keep the small row's precision
    (one scale for the whole step would round it to zero), and a zero row stays zero."""
    dense = linear(128, 32)
    layer = W8A8Linear(dense.weight.data, None)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    x[0] *= 1000.0
    x[2] = 0.0
    got, want = layer(x), dense(x)
    assert relative_error(got[1:2], want[1:2]) < 0.02
    assert relative_error(got[0:1], want[0:1]) < 0.02
    assert torch.equal(got[2], torch.zeros(32))


def test_int8s_chunked_dense_path_equals_the_whole_dequantised_weight(monkeypatch):
    """The dense path CUDA takes for 17 rows or more (run here on CPU): a few output channels at a time, scaled after
    the product, equals the product with the whole dequantised weight."""
    monkeypatch.setattr(quantization, "CUDA_DEQUANTIZE_CHUNK", 7)  # 20 channels: chunks of 7, 7 and 6
    torch.manual_seed(0)
    layer = quantization.Int8Linear(torch.randn(32, 20), torch.randn(20))
    x = torch.randn(24, 32)
    whole = torch.nn.functional.linear(x, layer.qweight.float() * layer.scale.float()[:, None], layer.bias)
    assert torch.allclose(layer._dense_in_chunks(x), whole, rtol=1e-5, atol=1e-4)
