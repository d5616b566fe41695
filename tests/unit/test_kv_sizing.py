"""KV blocks sized from GPU memory (`engine.gpu_memory_utilization`), on faked memory readings: CI has no GPU, and
what is checked is the arithmetic of shares, not the driver."""

import pytest
import torch

from pdserve.engine import EngineConfig
from pdserve.engine.acceleration import ACTIVATION_RESERVE_GIB, kv_blocks_from_free_memory
from pdserve.engine.config import ConfigError

GIB = 2**30
TOTAL = 80 * GIB
BLOCK = GIB // 64  # 16 MiB a block


def fake_gpu(monkeypatch, ours_gib: float, others_gib: float) -> None:
    """A GPU of 80 GiB where this process holds `ours_gib` and other processes `others_gib`."""
    free = TOTAL - (ours_gib + others_gib) * GIB
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(free), TOTAL))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: int(ours_gib * GIB))


def blocks(utilization: float) -> int:
    return kv_blocks_from_free_memory(EngineConfig(device="cuda:0", gpu_memory_utilization=utilization), BLOCK)


def test_alone_the_cache_fills_the_share_less_weights_and_reserve(monkeypatch):
    fake_gpu(monkeypatch, ours_gib=16, others_gib=0.5)
    assert blocks(0.9) == int((0.9 * 80 - 16 - ACTIVATION_RESERVE_GIB) * 64)


def test_two_engines_share_a_gpu_each_within_its_own_share(monkeypatch):
    fake_gpu(monkeypatch, ours_gib=8, others_gib=36)  # the first engine: 8 GiB of weights and a 28 GiB cache
    assert blocks(0.45) == int((0.45 * 80 - 8 - ACTIVATION_RESERVE_GIB) * 64)


def test_the_cache_never_takes_more_than_is_free(monkeypatch):
    fake_gpu(monkeypatch, ours_gib=8, others_gib=60)
    assert blocks(0.9) == int((80 - 68 - ACTIVATION_RESERVE_GIB) * 64)


def test_no_room_is_a_config_error_naming_the_field(monkeypatch):
    fake_gpu(monkeypatch, ours_gib=16, others_gib=0)
    with pytest.raises(ConfigError, match="engine.gpu_memory_utilization: 0.2 of 80.0 GiB leaves no room"):
        blocks(0.2)
