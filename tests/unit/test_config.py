"""Boundary validation: EngineConfig.from_dict, SamplingParams, Prompt(.from_json), ModelConfig.from_hf_config."""

import dataclasses

import pytest

from pdserve.engine.config import ConfigError, EngineConfig, ModelConfig, RopeScaling
from pdserve.engine.request import Message, Prompt, PromptError
from pdserve.engine.sampling_params import SamplingError, SamplingParams

# ---- EngineConfig ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, field", [
    ({"blok_size": 16}, "engine.blok_size"),
    ({"block_size": "16"}, "engine.block_size"),
    ({"block_size": True}, "engine.block_size"),
    ({"block_size": 1.5}, "engine.block_size"),
    ({"block_size": -4}, "engine.block_size"),
    ({"block_size": 0}, "engine.block_size"),
    ({"max_num_seqs": False}, "engine.max_num_seqs"),
    ({"max_num_batched_tokens": 0}, "engine.max_num_batched_tokens"),
    ({"num_kv_blocks": 0}, "engine.num_kv_blocks"),
    ({"kv_cache_gib": "1"}, "engine.kv_cache_gib"),
    ({"kv_cache_gib": 0}, "engine.kv_cache_gib"),
    ({"kv_cache_gib": float("inf")}, "engine.kv_cache_gib"),
    ({"model": 3}, "engine.model"),
    ({"dtype": "fp8"}, "engine.dtype"),
    ({"device": "tpu"}, "engine.device"),
    ({"max_model_len": -1}, "engine.max_model_len"),
    ({"num_threads": 0}, "engine.num_threads"),
    ({"hardware": "h100"}, "engine.hardware: unknown field"),  # the sim's fields live under engine.sim
    ({"sim": {"time_scale": 0}}, "engine.sim.time_scale"),
    ({"sim": {"tensor_parallel": "2"}}, "engine.sim.tensor_parallel"),
    ({"sim": {"kv_link": "pcie"}}, "engine.sim.kv_link"),
    ({"sim": {"hardwar": "h100"}}, "engine.sim.hardwar"),
    ({"sim": [1]}, "engine.sim: must be a mapping"),
    ({"speculative": {"method": "medusa"}}, "engine.speculative.method"),
    ({"speculative": {"k": 0}}, "engine.speculative.k"),
    ({"speculative": {"max_batch": 0}}, "engine.speculative.max_batch"),
    ({"speculative": {"kk": 2}}, "engine.speculative.kk"),
    ({"speculative": "prompt_lookup"}, "engine.speculative: must be a mapping"),
    ({"speculative": {"method": "draft", "draft_quantization": "int2"}}, "engine.speculative.draft_quantization"),
    ({"speculative": {"method": "draft", "draft_layers": 0}}, "engine.speculative.draft_layers"),
    ({"speculative": {"method": "lookahead", "lookahead_window": 0}}, "engine.speculative.lookahead_window"),
    ({"speculative": {"method": "draft", "draft_quantization": "none"}}, "the draft would be the model itself"),
])
def test_engine_config_errors_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        EngineConfig.from_dict(values)


def test_engine_config_rejects_a_non_mapping():
    with pytest.raises(ConfigError, match="engine"):
        EngineConfig.from_dict([("block_size", 16)])


@pytest.mark.parametrize("field, value, message", [
    ("quantization", "int3", "engine.quantization"), ("attention", "flash", "engine.attention"),
    ("cuda_graphs", "yes", "engine.cuda_graphs"), ("compile", 1, "engine.compile"),
    ("gpu_memory_utilization", 1.5, "engine.gpu_memory_utilization"),
])
def test_engine_acceleration_fields_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_dict({field: value})


def test_engine_config_round_trips():
    values = {"model": "random:tiny", "dtype": "bf16", "device": "cuda:1", "block_size": 8, "num_kv_blocks": 100,
              "kv_cache_gib": 2, "max_num_batched_tokens": 256, "max_num_seqs": 4, "max_model_len": None, "seed": 3,
              "num_threads": 2, "backend": "sim",
              "sim": {"hardware": "h200", "tensor_parallel": 2, "gpu_memory_fraction": 0.8, "time_scale": 10.0,
                      "kv_link": "nvlink"},
              "quantization": "int4", "attention": "triton", "cuda_graphs": False, "compile": True,
              "gpu_memory_utilization": 0.5, "prefix_caching": False,
              "speculative": {"method": "draft", "k": 6, "max_batch": 2, "draft_quantization": "none",
                              "draft_layers": 2, "lookahead_window": 5, "lookahead_ngram": 4, "adaptive": False}}
    config = EngineConfig.from_dict(values)
    assert dataclasses.asdict(config) == values
    assert EngineConfig.from_dict(dataclasses.asdict(config)) == config
    assert EngineConfig.from_dict({}) == EngineConfig()


# ---- SamplingParams --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"stop": ("",)}, "stop"),
    ({"stop": ("ok", "")}, "stop"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"),
])
def test_sampling_params_errors_name_the_field(kwargs, field):
    with pytest.raises(SamplingError, match=f"^{field}:"):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_edges():
    p = SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=("\n",), stop_token_ids=(0,))
    assert p.greedy
    assert not SamplingParams(temperature=0.5).greedy


# ---- Prompt ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({}, "prompt"),
    ({"text": "hi", "token_ids": (1,)}, "prompt"),
    ({"text": "hi", "messages": (Message("user", "hi"),)}, "prompt"),
    ({"text": ""}, "prompt.text"),
    ({"messages": ()}, "prompt.messages"),
    ({"messages": (Message("user", "a"), Message("<|im_start|>", "b"))}, r"prompt.messages\[1\].role"),
    ({"messages": (Message("user", "a"), Message("assistant ", "b"))}, r"prompt.messages\[1\].role"),
    ({"token_ids": ()}, "prompt.token_ids"),
])
def test_prompt_errors_name_the_field(kwargs, field):
    with pytest.raises(PromptError, match=f"^{field}:"):
        Prompt(**kwargs)


def test_prompt_from_json_line_shapes():
    assert Prompt.from_json({"prompt": "hello"}) == Prompt(text="hello")
    assert Prompt.from_json({"token_ids": [1, 2, 3]}) == Prompt(token_ids=(1, 2, 3))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert Prompt.from_json({"messages": messages}) == Prompt(
        messages=(Message("system", "be brief"), Message("user", "hi")))
    assert Prompt.from_json({"prompt": "x", "request_id": "a"}).text == "x"  # other keys are the caller's


@pytest.mark.parametrize("line, field", [
    ({}, "input line"),
    ({"request_id": "a"}, "input line"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt.text"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "prompt.messages"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\]"),
    ({"messages": ["hi"]}, r"messages\[0\]"),
    ({"messages": [{"role": "user", "content": 1}]}, r"messages\[0\]"),
    ({"messages": [{"role": "b o t", "content": "x"}]}, r"prompt.messages\[0\].role"),
    ({"token_ids": []}, "prompt.token_ids"),
])
def test_prompt_from_json_bad_lines(line, field):
    with pytest.raises(PromptError, match=f"^{field}:"):
        Prompt.from_json(line)


@pytest.mark.parametrize("token_ids", ["123", [1.9], [True]])
def test_prompt_from_json_rejects_non_integer_token_ids(token_ids):
    with pytest.raises(PromptError, match="token_ids"):
        Prompt.from_json({"token_ids": token_ids})


# ---- ModelConfig.from_hf_config --------------------------------------------------------------------------------

LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 160,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": [2, 3]}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
LLAMA3_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64)


def test_hf_config_plain_llama():
    config = ModelConfig.from_hf_config(LLAMA)
    assert (config.architecture, config.head_dim, config.num_kv_heads) == ("llama", 16, 2)
    assert (config.rope_theta, config.rope_scaling, config.attention_bias) == (10000.0, None, False)
    assert (config.bos_token_id, config.eos_token_ids, config.tie_word_embeddings) == (1, (2, 3), True)


def test_hf_config_transformers5_rope_parameters():
    config = ModelConfig.from_hf_config(LLAMA | {"rope_parameters": LLAMA3 | {"rope_theta": 500000.0}})
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == LLAMA3_SCALING
    default = ModelConfig.from_hf_config(LLAMA | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert (default.rope_theta, default.rope_scaling) == (1e6, None)


def test_hf_config_old_style_rope_theta_and_rope_scaling():
    config = ModelConfig.from_hf_config(LLAMA | {"rope_theta": 500000.0, "rope_scaling": LLAMA3})
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == LLAMA3_SCALING
    legacy_key = {k: v for k, v in LLAMA3.items() if k != "rope_type"} | {"type": "llama3"}
    assert ModelConfig.from_hf_config(LLAMA | {"rope_scaling": legacy_key}).rope_scaling == LLAMA3_SCALING
    none = ModelConfig.from_hf_config(LLAMA | {"rope_theta": 1e6, "rope_scaling": None})
    assert (none.rope_theta, none.rope_scaling) == (1e6, None)


def test_hf_config_qwen2_has_attention_bias():
    config = ModelConfig.from_hf_config(LLAMA | {"model_type": "qwen2", "eos_token_id": 5})
    assert (config.architecture, config.attention_bias, config.eos_token_ids) == ("qwen2", True, (5,))


def test_hf_config_rejects_unsupported_model_type():
    with pytest.raises(ConfigError, match="model_type: 'mistral'"):
        ModelConfig.from_hf_config(LLAMA | {"model_type": "mistral"})


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_hf_config_rejects_unsupported_rope_type(key):
    with pytest.raises(ConfigError, match="rope_type: 'yarn'"):
        ModelConfig.from_hf_config(LLAMA | {key: {"rope_type": "yarn", "factor": 4.0}})


def test_model_config_rejects_bad_shapes():
    with pytest.raises(ConfigError, match="model.num_kv_heads"):
        ModelConfig.from_hf_config(LLAMA | {"num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="model.vocab_size"):
        ModelConfig.from_hf_config(LLAMA | {"vocab_size": 0})
