"""Profiling a real (torch) engine into the controller's performance model."""

from pdserve.engine import Engine, EngineConfig
from pdserve.engine.step_profile import profile_engine


def test_profile_fits_non_negative_lines_and_leaves_the_engine_idle():
    engine = Engine(EngineConfig(model="random:smollm2-135m", num_kv_blocks=256, num_threads=1))
    profile = profile_engine(engine, short=16, long=64, batches=(1, 4), repeats=2)
    for value in (profile.prefill_fixed_s, profile.prefill_s_per_token, profile.decode_fixed_s,
                  profile.decode_s_per_seq, profile.decode_s_per_kv_token):
        assert value >= 0
    assert profile.prefill_seconds(64) > 0 and profile.prefill_seconds(64) >= profile.prefill_seconds(16)
    assert profile.decode_step_seconds(4, 64) >= profile.decode_step_seconds(1, 16) > 0
    assert profile.decode_step_seconds(0, 64) == 0
    assert engine.num_requests == 0 and engine.blocks.num_used == 0
    # The repeated synthetic prompts were computed each time, not served from the prefix cache, which stays on.
    assert engine.cached_tokens_total == 0 and engine.blocks.num_cached == 0 and engine.blocks.caching
