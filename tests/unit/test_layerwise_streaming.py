"""Layer-wise KV streaming (`kv_transfer.layerwise`): the prefill worker starts a request's send when the engine
schedules its last prompt chunk, each layer goes on the wire once the step has computed it, and the first token
follows the announcement. Workers in this process, random SmolLM2-shaped weights (one engine is the oracle), KV
over the torch.distributed connector on a transport that matches by order (`kv_transfer.loopback`)."""

import asyncio
import time

import pytest
import torch

from pdserve.config import KVTransfer
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine import Engine, EngineConfig, FinishReason, SamplingParams
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.layer_progress import LayerProgress
from pdserve.kv_transfer.connector import Transfer, TransferStatus
from pdserve.kv_transfer.loopback import LoopbackGroup
from pdserve.kv_transfer.send_delay import InjectedPause
from pdserve.kv_transfer.torch_dist import TorchDistConnector
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve.registry.entries import Role
from pdserve.worker.messages import DecodeTask, FirstToken, KVAnnouncement, Owner, PrefillTask
from pdserve.worker.runtime import WorkerSpec

CONFIG = EngineConfig(model="random:smollm2-135m", num_kv_blocks=64, max_num_batched_tokens=64, num_threads=1)
PROMPT = tuple(range(100, 190))  # 90 tokens: two prefill chunks, the second streamed
STREAMED = KVTransfer(layerwise=True, timeout_s=20)
TINY = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position=256,
                   tie_word_embeddings=True)


@pytest.fixture(scope="module")
def oracle() -> Engine:
    return Engine(CONFIG)


class LocalPeers:
    """The decode worker, reached in this process; records what the prefill worker told it, and can hold back
    announcements (Ray may run two calls out of order)."""

    def __init__(self, hold_announcements: bool = False) -> None:
        self.decode: DecodeWorker | None = None
        self.told: list = []
        self.held: list[KVAnnouncement] = []
        self.hold_announcements = hold_announcements

    def announce(self, decode_worker: str, message) -> None:
        self.told.append(message)
        if isinstance(message, FirstToken):
            asyncio.ensure_future(self.decode.first_token(message))
        elif self.hold_announcements:
            self.held.append(message)
        else:
            asyncio.ensure_future(self.decode.announce(message))


async def started_pair(peers: LocalPeers):
    prefill_connector, decode_connector = TorchDistConnector("prefill-0"), TorchDistConnector("decode-0")
    prefill = PrefillWorker(WorkerSpec("prefill-0", Role.PREFILL, CONFIG, kv_transfer=STREAMED), prefill_connector,
                            peers=peers)
    decode = DecodeWorker(WorkerSpec("decode-0", Role.DECODE, CONFIG, kv_transfer=STREAMED), decode_connector)
    peers.decode = decode
    await asyncio.gather(prefill.start(), decode.start())
    first, second = LoopbackGroup.pair()
    prefill_connector.add_pair("decode-0", first, 1)
    decode_connector.add_pair("prefill-0", second, 0)
    return prefill, decode


async def handoff(prefill: PrefillWorker, decode: DecodeWorker, key: str, sampling: SamplingParams):
    reservation = await decode.reserve(DecodeTask(key, PROMPT, sampling, Owner("router-a", key), "prefill-0"))
    return await prefill.prefill(PrefillTask(key, PROMPT, sampling, "decode-0", reservation.tag))


async def tokens_until_finished(decode: DecodeWorker, request_id: str) -> tuple[int, ...]:
    events, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        events += [e for e in await decode.events("router-a", 0.5) if e.request_id == request_id]
        if events and events[-1].finish_reason is not None:
            return tuple(t for e in events for t in e.token_ids)
    raise TimeoutError(request_id)


async def idle(*workers, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(w.runtime.thread.load.kv_blocks_used == 0 for w in workers) and all([await w.idle() for w in workers]):
            return True
        await asyncio.sleep(0.02)
    return False


@pytest.mark.parametrize("hold_announcements", [False, True])
def test_a_streamed_handoff_matches_one_engine_whichever_message_comes_first(oracle, hold_announcements):
    sampling = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = oracle.generate([list(PROMPT)], sampling)[0].token_ids

    async def go():
        peers = LocalPeers(hold_announcements)
        prefill, decode = await started_pair(peers)
        result = await handoff(prefill, decode, "r1", sampling)
        await asyncio.sleep(0.1)
        for announcement in peers.held:  # the first token came first
            await decode.announce(announcement)
        tokens = await tokens_until_finished(decode, "r1")
        assert await idle(prefill, decode)
        await asyncio.gather(prefill.stop(), decode.stop())
        return result, tokens, peers.told

    result, tokens, told = asyncio.run(go())
    assert tokens == expected and result.first_token_id == expected[0] and result.finish_reason is None
    assert [type(m) for m in told] == [KVAnnouncement, FirstToken]
    assert told[0].first_token_id is None and told[0].num_blocks == 6  # announced before the token existed
    assert told[1].first_token_id == expected[0] and not told[1].finished


def test_a_request_that_ends_at_its_first_token_drops_the_streamed_kv_and_leaks_nothing():
    sampling = SamplingParams(max_tokens=1, temperature=0)

    async def go():
        peers = LocalPeers()
        prefill, decode = await started_pair(peers)
        result = await handoff(prefill, decode, "r1", sampling)
        assert await idle(prefill, decode)
        after = await handoff(prefill, decode, "r2", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        tokens = await tokens_until_finished(decode, "r2")  # the pair is still in step
        assert await idle(prefill, decode)
        await asyncio.gather(prefill.stop(), decode.stop())
        return result, after, tokens, peers.told

    result, after, tokens, told = asyncio.run(go())
    assert result.finish_reason is FinishReason.LENGTH
    assert isinstance(told[1], FirstToken) and told[1].finished
    assert after.finish_reason is None and len(tokens) == 4


def test_a_routers_abort_after_the_first_token_ended_the_request_waits_for_the_kv_still_coming():
    """The request ended at its first token while its KV was still streaming in, so the decode worker let go of it
    and waits for the receive to stop before freeing its blocks; the router's abort that follows (it was not told
    the request ended on that worker) must neither free them early nor, once the receive reports, kill the worker."""
    sampling = SamplingParams(max_tokens=1, temperature=0)

    async def go():
        peers = LocalPeers()
        prefill, decode = await started_pair(peers)
        prefill.runtime.connector.send_delay = InjectedPause(1.0, 1)  # a slow wire: the KV is still coming
        await handoff(prefill, decode, "r1", sampling)
        await asyncio.sleep(0.2)  # the decode worker has heard that the request ended
        await decode.abort("r1", "router-a")
        held = decode.runtime.thread.load.kv_blocks_used
        assert await idle(prefill, decode)
        failure = decode.runtime.thread.failure
        after = await handoff(prefill, decode, "r2", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        tokens = await tokens_until_finished(decode, "r2")
        await asyncio.gather(prefill.stop(), decode.stop())
        return held, failure, after, tokens

    held, failure, after, tokens = asyncio.run(go())
    assert held > 0 and failure is None  # kept while written, freed after; the worker serves on
    assert after.finish_reason is None and len(tokens) == 4


def test_each_layer_goes_on_the_wire_only_once_it_is_computed():
    sender, receiver = TorchDistConnector("p"), TorchDistConnector("d")
    for side, seed in ((sender, 1), (receiver, 2)):
        kv = KVCache(TINY, num_blocks=8, block_size=4, dtype=torch.float32, device="cpu")
        kv.tensor.copy_(torch.randn(kv.tensor.shape, generator=torch.Generator().manual_seed(seed)))
        side.register(kv)
    first, second = LoopbackGroup.pair()
    sender.add_pair("d", first, 1)
    receiver.add_pair("p", second, 0)
    progress = LayerProgress(TINY.num_layers)
    sender.start_send(Transfer("t", "d", (1, 2), tag=1, timeout_s=10, progress=progress))
    receiver.start_recv(Transfer("t", "p", (5, 6), tag=1, timeout_s=10))
    sent = []
    for layer in range(TINY.num_layers):
        time.sleep(0.1)
        sent.append(first.sent)
        sender.kv_cache.tensor[:, layer, 1:3] += 1.0  # the step writes the layer's KV, then marks it
        progress.layer_done(layer)
    results, deadline = {}, time.monotonic() + 10
    while len(results) < 2 and time.monotonic() < deadline:
        results.update({(side.worker_id, r.transfer_id): r for side in (sender, receiver) for r in side.poll()})
    assert sent == [2, 4, 6]  # header and lengths, then K and V of each layer done so far
    assert {r.status for r in results.values()} == {TransferStatus.DONE}
    assert torch.equal(receiver.kv_cache.read_blocks((5, 6)), sender.kv_cache.read_blocks((1, 2)))


def test_a_step_that_raises_abandons_its_streams():
    progress = LayerProgress(3)
    progress.layer_done(0)
    assert progress.wait(0, time.monotonic() + 1) is None
    progress.abandon()
    with pytest.raises(RuntimeError, match="layer 1 of 3"):
        progress.wait(1, time.monotonic() + 1)
    with pytest.raises(TimeoutError):
        LayerProgress(3).wait(0, time.monotonic() + 0.05)
