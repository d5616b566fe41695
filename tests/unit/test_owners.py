"""Who owns each request on a decode worker (`decode_worker.owners`), on a clock the test moves: each router gets
only its own events, at their positions in its client's output; collecting renews a router's lease and
acknowledges requests; a lapsed lease reaps; adoption hands a request over with what its client lacks."""

import asyncio

import pytest

from pdserve.decode_worker.owners import Owners
from pdserve.engine.request import FinishReason
from pdserve.worker.messages import Owner, TokenEvent, prompt_digest


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def owners(lease_s: float = 10.0) -> tuple[Owners, Clock]:
    clock = Clock()
    return Owners(lease_s, clock), clock


@pytest.fixture
def run():
    """Runs coroutines on one event loop, as a worker's calls all are."""
    with asyncio.Runner() as runner:
        yield runner.run


def tokens(request_id: str, position: int, *ids: int, finish: FinishReason | None = None) -> TokenEvent:
    """An event as the engine thread makes it: its position counted from the attempt's start."""
    return TokenEvent(request_id, position, ids, "".join(f"<{i}>" for i in ids), finish)


def test_each_router_collects_only_its_own_events_at_their_client_positions(run):
    o, _ = owners()
    o.add("a#0", Owner("router-a", "a", position=0))
    o.add("b#1", Owner("router-b", "b", position=5))  # a resumed attempt: its client already has 5 tokens
    o.record([tokens("a#0", 0, 1), tokens("b#1", 0, 7), tokens("a#0", 1, 2), tokens("gone", 0, 9)])
    a, b = run(o.take("router-a", 0.01)), run(o.take("router-b", 0.01))
    assert [(e.request_id, e.position, e.token_ids) for e in a] == [("a#0", 0, (1,)), ("a#0", 1, (2,))]
    assert [(e.request_id, e.position, e.token_ids) for e in b] == [("b#1", 5, (7,))]
    assert run(o.take("router-a", 0.01)) == [] and not o.undelivered()


def test_a_lease_lapses_only_for_a_router_that_stopped_collecting(run):
    o, clock = owners(lease_s=10)
    o.add("a#0", Owner("router-a", "a"))
    o.add("b#0", Owner("router-b", "b"))
    for _ in range(3):  # router a collects every 4 s, router b never
        clock.now += 4
        run(o.take("router-a", 0.01))
        assert o.expired() == ([] if clock.now < 111 else ["b#0"])
    assert o.owner("a#0") is not None and o.owner("b#0") is None
    assert run(o.take("router-b", 0.01)) == [] and o.expired() == []  # a router coming back starts a new lease


def test_acknowledged_requests_leave_and_events_of_forgotten_ones_are_dropped(run):
    o, _ = owners()
    o.add("a#0", Owner("router-a", "a"))
    o.record([tokens("a#0", 0, 1, finish=FinishReason.STOP)])
    assert [e.finish_reason for e in run(o.take("router-a", 0.01, ["a#0"]))] == [FinishReason.STOP]
    assert o.owner("a#0") is None and len(o) == 0
    o.record([tokens("a#0", 1, 2)])  # a late event of it: nobody wants it
    assert run(o.take("router-a", 0.01)) == []
    o.add("x#0", Owner("router-b", "x"))
    run(o.take("router-a", 0.01, ["x#0"]))  # not router a's to acknowledge
    assert o.owner("x#0") is not None


def test_adoption_hands_over_what_the_client_lacks_and_ends_the_old_routers_stream(run):
    o, _ = owners()
    o.add("c@router-a#0", Owner("router-a", "c"), prefill_worker="prefill-3")
    o.record([tokens("c@router-a#0", 0, 10), tokens("c@router-a#0", 1, 11), tokens("c@router-a#0", 2, 12)])
    assert o.adopt("c", "router-b", 4, "") is None  # the client claims more than the worker made
    assert o.adopt("someone-else", "router-b", 0, "") is None
    adoption = o.adopt("c", "router-b", 1, "")
    assert (adoption.request_id, adoption.prefill_worker) == ("c@router-a#0", "prefill-3")
    assert [e.token_ids for e in adoption.events] == [(11,), (12,)]
    old = run(o.take("router-a", 0.01))
    assert [(e.adopted_by, e.finish_reason, e.token_ids) for e in old] == [("router-b", FinishReason.ABORT, ())]
    o.record([tokens("c@router-a#0", 3, 13)])
    assert [e.token_ids for e in run(o.take("router-b", 0.01))] == [(13,)] and run(o.take("router-a", 0.01)) == []
    assert o.owner("c@router-a#0").router_id == "router-b"


def test_a_request_whose_kv_is_still_on_its_way_is_not_taken_over_until_its_first_token(run):
    """Only its first router hears how its prefill ends (a first token that ends it, a cancelled or failed prefill):
    a new owner would wait forever and its blocks stay held, so the new router resumes it elsewhere instead."""
    o, _ = owners()
    o.add("c@router-a#2", Owner("router-a", "c", position=6))  # a resumed attempt, not decoding yet
    assert o.adopt("c", "router-b", 6, "") is None and o.owner("c@router-a#2").router_id == "router-a"
    o.record([tokens("c@router-a#2", 0, 42)])
    assert o.adopt("c", "router-b", 5, "") is None  # the client lacks tokens this attempt does not have
    adoption = o.adopt("c", "router-b", 6, "")
    assert [(e.position, e.token_ids) for e in adoption.events] == [(6, (42,))]


def test_another_clients_request_of_the_same_id_is_not_taken_over(run):
    """Client ids are the clients' own: a request is handed over only to a client naming the same prompt."""
    o, _ = owners()
    o.add("job-1@router-c#0", Owner("router-c", "job-1", prompt_digest=prompt_digest((1, 2, 3))))
    o.record([tokens("job-1@router-c#0", 0, 12), tokens("job-1@router-c#0", 1, 13)])
    assert o.adopt("job-1", "router-b", 1, prompt_digest((7, 8, 9))) is None
    assert o.owner("job-1@router-c#0").router_id == "router-c" and run(o.take("router-c", 0.01)) != []
    assert o.adopt("job-1", "router-b", 1, prompt_digest((1, 2, 3))).request_id == "job-1@router-c#0"
