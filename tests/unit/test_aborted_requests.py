"""The record of aborted requests a worker keeps, so that work Ray runs after its abort is refused."""

from pdserve.worker.aborted import AbortedRequests


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_aborted_request_is_remembered_until_keep_s_has_passed():
    clock = Clock()
    aborted = AbortedRequests(keep_s=10, clock=clock)
    aborted.add("a")
    clock.now += 6
    aborted.add("b")
    assert "a" in aborted and "b" in aborted and "c" not in aborted
    clock.now += 5  # a is 11 s old, b 5 s
    assert "a" not in aborted and "b" in aborted
    assert len(aborted) == 1
    clock.now += 6
    assert len(aborted) == 0
