"""The engine thread (`cluster.engine_thread`): commands run between steps, and a step or callback that raises ends
the thread with its error kept, so that every caller learns of it instead of waiting on a dead engine."""

import threading
import time

import pytest

from pdserve.worker.engine_thread import EngineThread

DEADLINE_S = 10


class FakeEngine:
    """Always has work; each step takes a moment and produces nothing."""

    def __init__(self) -> None:
        self.steps = 0

    def has_unfinished(self) -> bool:
        return True

    def step(self) -> list:
        self.steps += 1
        time.sleep(0.001)
        return []

    def load(self) -> None:
        return None


def wait_for(condition) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


def test_commands_run_on_the_engine_thread_between_steps():
    thread = EngineThread(FakeEngine, lambda engine, outputs: None, name="engine-test")
    engine = thread.start().result(DEADLINE_S)
    assert thread.start().result(0) is engine  # starting again hands back the same engine
    assert thread.call(lambda e: (e is engine, threading.current_thread().name)).result(DEADLINE_S) == \
        (True, "engine-test")
    wait_for(lambda: engine.steps > 3)
    thread.stop()
    with pytest.raises(RuntimeError, match="has stopped"):
        thread.call(lambda e: None).result(DEADLINE_S)


def test_a_callback_that_raises_ends_the_thread_and_names_the_error():
    broken = threading.Event()

    def after_step(engine, outputs):
        if broken.is_set():
            raise ValueError("boom")

    thread = EngineThread(FakeEngine, after_step, name="engine-test")
    thread.start().result(DEADLINE_S)
    assert thread.call(lambda e: "fine").result(DEADLINE_S) == "fine"
    broken.set()
    wait_for(lambda: thread.failure is not None)
    assert isinstance(thread.failure, ValueError)
    with pytest.raises(RuntimeError, match="the engine thread died: ValueError: boom"):
        thread.call(lambda e: None).result(DEADLINE_S)


def test_attach_hands_the_steps_to_new_callbacks():
    seen = []
    thread = EngineThread(FakeEngine, lambda engine, outputs: seen.append("old"), name="engine-test")
    thread.start().result(DEADLINE_S)
    thread.attach(lambda engine, outputs: seen.append("new"), None).result(DEADLINE_S)
    count = len(seen)
    wait_for(lambda: len(seen) > count + 3)
    thread.stop()
    assert seen[count:] and set(seen[count:]) == {"new"}


def test_commands_sent_while_the_engine_builds_learn_that_the_build_failed():
    release = threading.Event()

    def build():
        release.wait(DEADLINE_S)
        raise OSError("no weights")

    thread = EngineThread(build, lambda engine, outputs: None, name="engine-test")
    ready = thread.start()
    pending = thread.call(lambda e: "never")
    release.set()
    with pytest.raises(OSError, match="no weights"):
        ready.result(DEADLINE_S)
    with pytest.raises(RuntimeError, match="the engine thread died: OSError: no weights"):
        pending.result(DEADLINE_S)
    with pytest.raises(RuntimeError, match="OSError: no weights"):
        thread.call(lambda e: None).result(DEADLINE_S)


def test_every_command_sent_around_a_stop_is_answered():
    thread = EngineThread(FakeEngine, lambda engine, outputs: None, name="engine-test")
    thread.start().result(DEADLINE_S)
    futures = []
    sender = threading.Thread(target=lambda: futures.extend(thread.call(lambda e: "ran") for _ in range(2000)))
    sender.start()
    wait_for(lambda: len(futures) > 0)
    thread.stop()
    sender.join(DEADLINE_S)
    for future in futures:
        assert future.exception(DEADLINE_S) is None or "has stopped" in str(future.exception())
