"""The cluster YAML: the default file loads, and every kind of mistake names its field."""

import pytest

from pdserve.config import ClusterConfig, Mode, load_config, parse_config
from pdserve.engine.config import ConfigError


def test_default_file_loads_as_the_documented_cluster():
    cfg = load_config()
    assert cfg.mode is Mode.DISAGGREGATED and cfg.engine.model == "smollm2-135m-instruct"
    assert (cfg.workers.prefill.count, cfg.workers.decode.count) == (1, 1)
    assert cfg.kv_transfer.backend == "gloo" and cfg.router.host == "127.0.0.1" and cfg.redis_url is None
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
    ({"controller": {"rebalance_load": -1}}, "controller.rebalance_load"),
    ({"controller": {"confirm_ticks": 0}}, "controller.confirm_ticks"),
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
