"""HangWatch: a worker is hung when it has not answered, or its engine has been inside one step, for hung_after_s;
a worker not yet watched (starting) is never judged."""

from pdserve.control_plane.hang_watch import HangWatch
from pdserve.registry.entries import Role, WorkerInfo, WorkerState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def info(stalled_s: float = 0.0) -> WorkerInfo:
    return WorkerInfo("decode-0", Role.DECODE, "c-decode-0", 1, WorkerState.READY, engine_stalled_s=stalled_s)


def test_a_worker_that_stops_answering_is_hung_after_the_bound():
    clock = Clock()
    watch = HangWatch(10.0, clock)
    watch.watch("decode-0")
    clock.now += 5
    watch.answered("decode-0", info())
    clock.now += 9.9
    assert watch.hung() == {}
    clock.now += 0.2
    assert list(watch.hung()) == ["decode-0"]


def test_an_engine_stuck_in_one_step_is_hung_though_its_actor_answers():
    clock = Clock()
    watch = HangWatch(10.0, clock)
    watch.watch("decode-0")
    for stalled in (4.0, 8.0):
        clock.now += 4
        watch.answered("decode-0", info(stalled_s=stalled))
        assert watch.hung() == {}
    clock.now += 2
    watch.answered("decode-0", info(stalled_s=10.0))
    assert watch.hung() == {"decode-0": 10.0}


def test_progress_clears_the_judgement_and_unwatched_workers_are_never_judged():
    clock = Clock()
    watch = HangWatch(10.0, clock)
    watch.answered("prefill-0", info())  # still starting: not watched
    watch.watch("decode-0")
    clock.now += 9
    watch.answered("decode-0", info(stalled_s=0.5))
    clock.now += 9
    assert watch.hung() == {}
    watch.forget("decode-0")
    clock.now += 100
    assert watch.hung() == {} and not watch.watched("prefill-0")


def test_each_round_asks_briefly_enough_to_find_a_hang_in_time():
    assert HangWatch(15.0).ask_timeout_s(10.0) == 3.75
    assert HangWatch(100.0).ask_timeout_s(10.0) == 10.0
    assert HangWatch(1.0).ask_timeout_s(10.0) == 0.5
