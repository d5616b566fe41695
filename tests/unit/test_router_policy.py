"""Routing choices: decode by free blocks then running requests; prefill by queued prompt tokens."""

from pdserve.registry.entries import Role, WorkerInfo, WorkerState
from pdserve.router.policy import pick_decode, pick_prefill


def worker(worker_id: str, role: Role = Role.DECODE, used: int = 0, running: int = 0, queued: int = 0) -> WorkerInfo:
    return WorkerInfo(worker_id, role, f"actor-{worker_id}", 1, WorkerState.READY, running=running,
                      queued_prefill_tokens=queued, kv_blocks_used=used, kv_blocks_total=100)


def test_decode_goes_where_most_blocks_are_free_then_fewest_running():
    assert pick_decode([worker("a", used=50), worker("b", used=10), worker("c", used=30)]).worker_id == "b"
    assert pick_decode([worker("a", used=10, running=5), worker("b", used=10, running=2)]).worker_id == "b"
    assert pick_decode([worker("b"), worker("a")]).worker_id == "a"  # ties break by id
    assert pick_decode([]) is None


def test_prefill_goes_where_fewest_tokens_are_queued_counting_the_routers_own_in_flight():
    a, b = worker("a", Role.PREFILL, queued=100), worker("b", Role.PREFILL, queued=0)
    assert pick_prefill([a, b], {}).worker_id == "b"
    assert pick_prefill([a, b], {"b": 500}).worker_id == "a"  # the router's fresher count wins
    assert pick_prefill([], {}) is None


def test_worker_info_round_trips_through_json():
    info = worker("decode-0", used=7, running=3)
    assert WorkerInfo.from_json(info.to_json()) == info
    assert info.kv_blocks_free == 93
