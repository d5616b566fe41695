"""A prefill worker's KV pairs (`worker.kv_pairs`) with a fake registry, fake decode actors and a fake runtime: it
pairs with every ready decode worker (both sides at once, one generation), forms again a pair that broke on either
side, lets go of a decode worker that left, and carries its announcements."""

import asyncio
from dataclasses import dataclass, field

from pdserve.registry.entries import Role, WorkerInfo, WorkerState
from pdserve.worker import kv_pairs
from pdserve.worker.kv_pairs import PairKeeper
from pdserve.worker.messages import KVAnnouncement


@dataclass
class FakeRuntime:
    """This prefill worker's side: `connect` forms a pair, `paired()` lists those that work."""

    spec: object = field(default_factory=lambda: type("Spec", (), {"worker_id": "prefill-0", "namespace": "ns"})())
    pairs: dict[str, int] = field(default_factory=dict)
    """peer -> generation"""
    let_go: list[str] = field(default_factory=list)

    async def connect(self, peer: str, store: str, rank: int, generation: int) -> None:
        assert rank == 0
        self.pairs[peer] = generation

    def paired(self) -> set[str]:
        return set(self.pairs)

    async def disconnect(self, peer: str) -> None:
        self.pairs.pop(peer, None)
        self.let_go.append(peer)


class FakeDecode:
    """A decode worker's actor handle: records the `connect` and `announce` calls it gets."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, str, int, int]] = []
        self.announced: list[KVAnnouncement] = []

    @property
    def connect(self):
        return _Remote(lambda *args: self.connects.append(args))

    @property
    def announce(self):
        return _Remote(self.announced.append)


class _Remote:
    def __init__(self, fn) -> None:
        self.fn = fn

    async def remote(self, *args):
        self.fn(*args)


class FakeRegistry:
    def __init__(self) -> None:
        self.entries: dict[str, WorkerInfo] = {}

    def workers(self) -> list[WorkerInfo]:
        return list(self.entries.values())

    def put(self, worker_id: str, state: WorkerState = WorkerState.READY, paired: tuple[str, ...] = ()) -> None:
        self.entries[worker_id] = WorkerInfo(worker_id, Role.DECODE, f"default-{worker_id}", 1, state,
                                             store_address=f"file:/tmp/{worker_id}", paired=paired)


def keeper(monkeypatch, settle_s: float = 3.0, gone_s: float = 10.0):
    monkeypatch.setattr(kv_pairs, "PAIR_SETTLE_S", settle_s)
    monkeypatch.setattr(kv_pairs, "GONE_S", gone_s)
    registry, runtime = FakeRegistry(), FakeRuntime()
    actors: dict[str, FakeDecode] = {}
    made = PairKeeper(runtime, registry, lambda name: actors.setdefault(name, FakeDecode()))
    return made, registry, runtime, actors


async def checked(made: PairKeeper) -> None:
    await made.check()
    await asyncio.gather(*made._forming.values())


def test_it_pairs_with_each_ready_decode_worker_both_sides_at_once(monkeypatch):
    async def go():
        made, registry, runtime, actors = keeper(monkeypatch)
        registry.put("decode-0")
        registry.put("decode-1", WorkerState.STARTING)
        await checked(made)
        assert runtime.pairs == {"decode-0": 0} and "default-decode-1" not in actors
        assert actors["default-decode-0"].connects == [("prefill-0", "file:/tmp/decode-0", 1, 0)]
        registry.put("decode-1")
        await checked(made)
        await checked(made)  # nothing new to do
        return runtime.pairs, actors["default-decode-1"].connects

    pairs, connects = asyncio.run(go())
    assert pairs == {"decode-0": 0, "decode-1": 0} and len(connects) == 1


def test_a_pair_that_broke_on_either_side_is_formed_again_under_a_new_generation(monkeypatch):
    async def go():
        made, registry, runtime, actors = keeper(monkeypatch, settle_s=0.0)
        registry.put("decode-0", paired=("prefill-0",))
        await checked(made)
        del runtime.pairs["decode-0"]  # a transfer failed here: the connector dropped it
        await checked(made)
        after_here = runtime.pairs["decode-0"]
        registry.put("decode-0", paired=())  # the decode side no longer lists it
        await checked(made)
        return after_here, runtime.pairs["decode-0"], [c[3] for c in actors["default-decode-0"].connects]

    after_here, after_there, generations = asyncio.run(go())
    assert (after_here, after_there) == (1, 2) and generations == [0, 1, 2]


def test_a_decode_worker_missing_only_briefly_keeps_its_pair_and_one_that_left_loses_it(monkeypatch):
    async def go():
        made, registry, runtime, _ = keeper(monkeypatch, gone_s=0.3)
        registry.put("decode-0", paired=("prefill-0",))
        await checked(made)
        registry.entries.clear()  # a restarted Redis, or a worker that died
        await checked(made)
        kept = dict(runtime.pairs)
        await asyncio.sleep(0.4)
        await checked(made)
        return kept, runtime.pairs, runtime.let_go, made.peers

    kept, pairs, let_go, peers = asyncio.run(go())
    assert kept == {"decode-0": 0} and pairs == {} and let_go == ["decode-0"] and peers == {}


def test_announcements_reach_their_decode_worker(monkeypatch):
    announcement = KVAnnouncement("r1", 7, "prefill-0", 42, 3)

    async def go():
        made, registry, _, actors = keeper(monkeypatch)
        registry.put("decode-0")
        await checked(made)
        made.announce("decode-0", announcement)
        made.announce("decode-9", announcement)  # not a peer: logged, nothing sent
        await asyncio.gather(*made._sends)
        return actors["default-decode-0"].announced

    assert asyncio.run(go()) == [announcement]

