"""The cluster YAML: the default file loads, and every kind of mistake names its field."""

import pytest

from pdserve.config import ClusterConfig, Mode, config_from_json, config_to_json, load_config, parse_config
from pdserve.engine.config import ConfigError


def test_default_file_loads_as_the_documented_cluster():
    cfg = load_config()
    assert cfg.mode is Mode.DISAGGREGATED and cfg.engine.model == "smollm2-135m-instruct"
    assert (cfg.workers.prefill.count, cfg.workers.decode.count) == (1, 1)
    assert cfg.kv_transfer.backend == "auto" and cfg.router.host == "127.0.0.1" and cfg.redis_url is None
    assert cfg == parse_config({})  # the file states the defaults


@pytest.mark.parametrize(("values", "field"), [
    ({"workers": {"prefill": {"count": -1}}}, "workers.prefill.count"),
    ({"workers": {"decode": {"resources": {"cpus": "two"}}}}, "workers.decode.resources.cpus"),
    ({"workers": {"decode": {"cuont": 2}}}, "workers.decode.cuont"),
    ({"kv_transfer": {"backend": "rdma"}}, "kv_transfer.backend"),
    ({"kv_transfer": {"timeout_s": 0}}, "kv_transfer.timeout_s"),
    ({"router": {"port": 70000}}, "router.port"),
    ({"mode": "split"}, "mode"),
    ({"engine": {"block_size": 0}}, "engine.block_size"),
    ({"engine": {"dtyp": "fp32"}}, "engine.dtyp"),
    ({"slo": {"tpot_s": -1}}, "slo.tpot_s"),
    ({"slo": 5}, "slo"),
    ({"mode": "colocated"}, "workers.colocated.count"),
    ({"kv_transfer": {"backend": "nccl"}}, "kv_transfer.backend"),
    ({"controller": {"shift_ratio": 0.5}}, "controller.shift_ratio"),
    ({"controller": {"rebalance_load": 1.0}}, "controller.rebalance_load: unknown field"),
    ({"controller": {"confirm_ticks": 0}}, "controller.confirm_ticks"),
    ({"controller": {"min_gain": -0.1}}, "controller.min_gain"),
    ({"controller": {"scale_down_load": 0.96}}, "controller.scale_down_load: must be below target_load"),
    ({"workers": {"prefill": {"engine": {"block_size": 32}}}}, "workers.prefill.engine.block_size: unknown field"),
    ({"workers": {"decode": {"engine": {"max_num_seqs": 0}}}}, "workers.decode.engine.max_num_seqs"),
    ({"workers": {"decode": {"engine": {"kv_cache_gib": "lots"}}}}, "workers.decode.engine.kv_cache_gib"),
    ({"router": {"lease_s": 0}}, "router.lease_s"),
    ({"faults": {"kv_send_pause_s": -1}}, "faults.kv_send_pause_s"),
    ({"kv_transfer": {"inject_send_pause_s": 4}}, "kv_transfer.inject_send_pause_s: unknown field"),
])
def test_mistakes_name_the_field(values, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        parse_config(values)


def test_bad_yaml_and_missing_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_colocated_mode():
    cfg = parse_config({"mode": "colocated", "workers": {"colocated": {"count": 2}}})
    assert isinstance(cfg, ClusterConfig) and cfg.workers.colocated.count == 2


def test_a_pools_engine_overrides_the_shared_one_and_the_rest_is_shared():
    cfg = parse_config({"engine": {"num_kv_blocks": 128, "max_num_seqs": 32},
                        "workers": {"prefill": {"engine": {"max_num_batched_tokens": 4096, "max_num_seqs": 2}},
                                    "decode": {"engine": {"kv_cache_gib": 2}}}})
    prefill = cfg.workers.prefill.engine_config(cfg.engine)
    decode = cfg.workers.decode.engine_config(cfg.engine)
    assert (prefill.max_num_batched_tokens, prefill.max_num_seqs, prefill.num_kv_blocks) == (4096, 2, 128)
    assert (decode.max_num_seqs, decode.num_kv_blocks, decode.kv_cache_gib) == (32, None, 2.0)
    assert cfg.workers.colocated.engine_config(cfg.engine) == cfg.engine


def test_the_config_travels_to_routers_as_json_and_back_unchanged():
    cfg = parse_config({"engine": {"backend": "sim", "model": "llama-3-8b", "sim": {"time_scale": 20}},
                        "workers": {"decode": {"count": 2, "engine": {"max_num_seqs": 8}}},
                        "router": {"lease_s": 12, "token_file": "/etc/token"},
                        "controller": {"enabled": True, "shift_ratio": float("inf")}, "faults": {"kv_send_pause_s": 1}})
    assert config_from_json(config_to_json(cfg)) == cfg


def test_router_ports_that_coincide_are_refused_naming_them():
    with pytest.raises(ConfigError, match="router ports must differ"):
        parse_config({"router": {"port": 9000, "http_port": 9000}})
    with pytest.raises(ConfigError, match="'metrics_port': 50051"):
        parse_config({"router": {"metrics_port": 50051}})
    assert parse_config({"router": {"http_port": None, "metrics_port": 9100}}).router.metrics_port == 9100
