"""The roofline cost model and the hardware table: the physics holds (decode is memory-bound, long prefill is
compute-bound, TP splits memory and adds communication, faster HBM decodes faster) and the bookkeeping is exact."""

import random

import pytest

from pdserve.engine import cost_model
from pdserve.engine.config import ConfigError
from pdserve.engine.cost_model import ChunkShape, CostModel, Link, _sums
from pdserve.engine.hardware import HARDWARE, hardware
from pdserve.engine.shapes import shape

H100 = hardware("h100")
H200 = hardware("h200")
LLAMA_8B = shape("llama-3-8b")
LLAMA_70B = shape("llama-3-70b")


def model(name: str = "llama-3-8b", hw: str = "h100", tp: int = 1) -> CostModel:
    return CostModel(shape(name), hardware(hw), tensor_parallel=tp)


# ---- hardware ----------------------------------------------------------------------------------------------------


def test_hardware_table_has_the_datasheet_figures():
    assert H100.peak_flops == 989e12 and H100.hbm_bytes_per_s == 3.35e12 and H100.nvlink_bytes_per_s == 450e9
    assert H100.memory_bytes == 80 * 2**30 and H100.network_bytes_per_s == 50e9
    assert H200.peak_flops == H100.peak_flops and H200.hbm_bytes_per_s == 4.8e12 and H200.memory_bytes == 141 * 2**30
    assert HARDWARE["a100"].peak_flops == 312e12 and HARDWARE["a100"].nvlink_bytes_per_s == 300e9
    assert all(hw.name == name for name, hw in HARDWARE.items())


def test_unknown_hardware_names_the_field_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"engine\.sim\.hardware.*'tpu-v9'.*a100.*h100.*h200"):
        hardware("tpu-v9")


# ---- memory sums -------------------------------------------------------------------------------------------------


def test_kv_bytes_per_token():
    assert model().kv_bytes_per_token() == 32 * 2 * 8 * 128 * 2 == 131072
    assert model("llama-3-70b", tp=8).kv_bytes_per_token() == 80 * 2 * 8 * 128 * 2
    # 16 ranks share 8 KV heads: each rank keeps a copy of one head, so the worker stores every head twice.
    assert model(tp=16).kv_bytes_per_token() == 2 * 131072


def test_weight_bytes_per_gpu():
    assert model().weight_bytes() == LLAMA_8B.num_parameters() * 2
    tp8 = model("llama-3-70b", tp=8).weight_bytes()
    assert LLAMA_70B.num_parameters() * 2 / 8 <= tp8 < LLAMA_70B.num_parameters() * 2 / 8 * 1.001  # + norms


def test_kv_capacity():
    cm = model()
    expected = (0.9 * 80 * 2**30 - LLAMA_8B.num_parameters() * 2) // 131072
    assert cm.kv_capacity_tokens() == expected
    assert cm.kv_capacity_tokens(0.5) < cm.kv_capacity_tokens(0.9)
    assert model("llama-3-70b", tp=8).kv_capacity_tokens() > 1_000_000


def test_70b_does_not_fit_on_one_h100():
    with pytest.raises(ConfigError, match=r"engine\.sim\.tensor_parallel"):
        model("llama-3-70b").kv_capacity_tokens()


@pytest.mark.parametrize("tp", [0, -1, 3, 64])
def test_bad_tensor_parallel_names_the_field(tp):
    with pytest.raises(ConfigError, match=r"engine\.sim\.tensor_parallel"):
        model(tp=tp)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        model().kv_capacity_tokens(0)
    with pytest.raises(ValueError):
        model().transfer_seconds(-1, Link.NVLINK)
    with pytest.raises(ValueError):
        ChunkShape(0, 10)
    with pytest.raises(ValueError):
        ChunkShape(5, 4)
    with pytest.raises(ValueError):
        model().prefill_seconds(100, chunk=0)
    with pytest.raises(ValueError):
        model().decode_step_seconds(4, 0)


# ---- transfers ---------------------------------------------------------------------------------------------------


def test_transfer_over_nvlink_beats_the_network_and_tp_ranks_send_in_parallel():
    cm = model()
    nbytes = 2048 * cm.kv_bytes_per_token()  # a 2k-token prompt's KV: 256 MiB
    nvlink, network = cm.transfer_seconds(nbytes, Link.NVLINK), cm.transfer_seconds(nbytes, Link.NETWORK)
    assert nvlink < network
    assert network == pytest.approx(nbytes / 50e9, rel=0.01)
    assert model(tp=2).transfer_seconds(nbytes, Link.NETWORK) == pytest.approx(network / 2, rel=0.01)
    assert cm.transfer_seconds(0, Link.NETWORK) == 0.0


# ---- steps -------------------------------------------------------------------------------------------------------


def test_empty_step_costs_nothing():
    cost = model().step_cost([])
    assert (cost.flops, cost.bytes, cost.seconds, cost.comm_s) == (0, 0, 0, 0)
    assert model().step_seconds([]) == 0.0 and model().decode_step_seconds(0, 100) == 0.0
    assert model().prefill_seconds(0) == 0.0
    assert cost.mfu(H100) == 0.0 and cost.mbu(H100) == 0.0


def test_batch_one_decode_is_memory_bound_and_costs_the_weight_read():
    cost = model().step_cost([ChunkShape(1, 100)])
    assert cost.memory_s > 50 * cost.compute_s
    embedding = LLAMA_8B.vocab_size * LLAMA_8B.hidden_size * 2  # gathered, not streamed
    weights_s = (LLAMA_8B.num_parameters() * 2 - embedding) / (3.35e12 * cost_model.MEMORY_EFFICIENCY)
    assert cost.seconds == pytest.approx(weights_s + cost_model.STEP_OVERHEAD_S, rel=0.01)
    assert 0.6 < cost.mbu(H100) < cost_model.MEMORY_EFFICIENCY


def test_long_prefill_is_compute_bound():
    cost = model().step_cost([ChunkShape(8192, 8192)])
    assert cost.compute_s > 10 * cost.memory_s
    assert 0.5 < cost.mfu(H100) < cost_model.COMPUTE_EFFICIENCY
    # ~2 FLOPs per weight per token, plus attention.
    assert cost.flops > 2 * 8192 * (LLAMA_8B.num_parameters() - 2 * LLAMA_8B.vocab_size * LLAMA_8B.hidden_size)


def test_doubling_the_prompt_doubles_prefill_and_attention_makes_it_more():
    cm = model()
    short, long = cm.step_cost([ChunkShape(4096, 4096)]), cm.step_cost([ChunkShape(8192, 8192)])
    assert 2.0 < long.compute_s / short.compute_s < 2.3  # quadratic attention on top of linear GEMMs
    assert 1.9 < cm.prefill_seconds(8192) / cm.prefill_seconds(4096) < 2.3


def test_tp2_halves_the_memory_time_and_adds_communication():
    one, two = model().step_cost([ChunkShape(1, 1000)] * 8), model(tp=2).step_cost([ChunkShape(1, 1000)] * 8)
    assert one.comm_s == 0.0 and two.comm_s > 0.0
    assert two.memory_s == pytest.approx(one.memory_s / 2, rel=0.02)
    assert two.flops == pytest.approx(one.flops / 2, rel=0.01)
    assert one.seconds / 2 < two.seconds < one.seconds
    # 2 all-reduces a layer: latency-bound for 8 tokens.
    assert two.comm_s == pytest.approx(2 * 32 * cost_model.ALLREDUCE_LATENCY_S, rel=0.05)


def test_h200_decodes_faster_than_h100_by_about_the_bandwidth_ratio():
    on_h100 = model().step_cost([ChunkShape(1, 2000)] * 16)
    on_h200 = model(hw="h200").step_cost([ChunkShape(1, 2000)] * 16)
    assert on_h100.memory_s / on_h200.memory_s == pytest.approx(4.8 / 3.35)
    assert 1.2 < on_h100.seconds / on_h200.seconds < 4.8 / 3.35
    # Prefill is compute-bound and the compute is the same.
    assert model(hw="h200").prefill_seconds(8192) == pytest.approx(model().prefill_seconds(8192), rel=0.05)


def test_decode_throughput_grows_with_batch_and_step_time_with_context():
    cm = model()
    assert cm.decode_step_seconds(64, 1000) < 2 * cm.decode_step_seconds(1, 1000)  # batching is almost free
    assert cm.decode_step_seconds(64, 8000) > cm.decode_step_seconds(64, 1000)  # more KV to read


def test_shortcuts_agree_with_step_cost():
    cm = model("llama-3-70b", tp=4)
    assert cm.decode_step_seconds(8, 500) == pytest.approx(cm.step_seconds([ChunkShape(1, 500)] * 8))
    assert cm.prefill_seconds(1000) == pytest.approx(cm.step_seconds([ChunkShape(1000, 1000)]))
    chunked = (cm.step_seconds([ChunkShape(256, 256, sample=False)]) + cm.step_seconds([ChunkShape(256, 512, False)])
               + cm.step_seconds([ChunkShape(256, 768, False)]) + cm.step_seconds([ChunkShape(232, 1000)]))
    assert cm.prefill_seconds(1000, chunk=256) == pytest.approx(chunked)
    assert cm.prefill_seconds(1000, chunk=256) > cm.prefill_seconds(1000)  # weights re-read, overhead per step


def test_only_sampling_chunks_run_the_lm_head():
    cm = model()
    sampled, not_sampled = cm.step_cost([ChunkShape(100, 100)]), cm.step_cost([ChunkShape(100, 100, sample=False)])
    assert sampled.flops - not_sampled.flops == pytest.approx(2 * LLAMA_8B.hidden_size * LLAMA_8B.vocab_size)


def test_step_sums_match_a_brute_force_count():
    rng = random.Random(0)
    for size in (1, 3, 7, 8, 30, 256):
        for decode_only in (True, False):
            chunks = []
            for _ in range(size):
                n = 1 if decode_only or rng.random() < 0.7 else rng.randint(1, 600)
                chunks.append(ChunkShape(n, n + rng.randint(0, 3000), sample=rng.random() < 0.8))
            pairs = sum(c.context_len - c.new_tokens + i + 1 for c in chunks for i in range(c.new_tokens))
            assert _sums(chunks) == (sum(c.new_tokens for c in chunks), sum(c.context_len for c in chunks), pairs,
                                     sum(c.sample for c in chunks))


def test_streamed_transfer_leaves_one_layer_exposed_or_what_the_step_could_not_hide():
    cm = model()
    layers = shape("llama-3-8b").num_layers
    nbytes = 2048 * cm.kv_bytes_per_token()
    whole = cm.transfer_seconds(nbytes, Link.NETWORK)
    assert cm.streamed_transfer_seconds(nbytes, Link.NETWORK, last_step_s=0.0) == pytest.approx(whole)
    long_step = 10 * whole  # the wire keeps up with the layers: only the last layer's share trails the step
    assert cm.streamed_transfer_seconds(nbytes, Link.NETWORK, long_step) == pytest.approx(whole / layers)
    short_step = whole / 2  # the wire is the bottleneck: it started one layer into the step
    expected = whole - short_step * (layers - 1) / layers
    assert cm.streamed_transfer_seconds(nbytes, Link.NETWORK, short_step) == pytest.approx(expected)
