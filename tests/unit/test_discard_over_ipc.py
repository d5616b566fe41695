"""KV announced for a request aborted on the decode worker is thrown away without touching a block, over the IPC
pair a single node uses by default. It was once received into block 0 and cancelled; when the sender's notice had come
first the copy ran at once, and block 0, the first block of an earlier prompt in the prefix cache, took the aborted
request's KV: a later request sharing that prefix decoded from it."""

import asyncio

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine import Engine, SamplingParams
from pdserve.kv_transfer.ipc_connector import IpcConnector
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve.registry.entries import Role
from pdserve.worker.messages import DecodeTask, Owner, PrefillTask
from pdserve.worker.runtime import WorkerSpec
from tests.unit.kv_pairing import join
from tests.unit.test_workers_in_process import CONFIG, ROUTER, events_until_finished, stop

SYSTEM = tuple(range(500, 548))  # three blocks of 16, shared by the first and the last request
FIRST, ABORTED, LAST = SYSTEM + tuple(range(100, 130)), tuple(range(900, 990)), SYSTEM + tuple(range(200, 230))
SAMPLING = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


class HeldAnnouncements:
    """The prefill worker's announcements to the decode worker, held back while `hold` is set."""

    def __init__(self) -> None:
        self.decode: DecodeWorker | None = None
        self.hold = False
        self.held = []

    def announce(self, decode_worker: str, announcement) -> None:
        if self.hold:
            self.held.append(announcement)
        else:
            asyncio.ensure_future(self.decode.announce(announcement))


async def served(prefill: PrefillWorker, decode: DecodeWorker, key: str, prompt: tuple[int, ...]) -> tuple[int, ...]:
    reservation = await decode.reserve(DecodeTask(key, prompt, SAMPLING, Owner(ROUTER, key), "prefill-0"))
    await prefill.prefill(PrefillTask(key, prompt, SAMPLING, "decode-0", reservation.tag, reservation.cached_blocks))
    return tuple(t for e in await events_until_finished(decode, key) for t in e.token_ids)


def test_kv_of_an_aborted_request_never_lands_in_a_cached_block():
    expected = Engine(CONFIG).generate([list(LAST)], SAMPLING)[0].token_ids

    async def go() -> tuple[int, ...]:
        peers = HeldAnnouncements()
        sending, receiving = IpcConnector("prefill-0"), IpcConnector("decode-0")
        prefill = PrefillWorker(WorkerSpec("prefill-0", Role.PREFILL, CONFIG), sending, peers=peers)
        decode = peers.decode = DecodeWorker(WorkerSpec("decode-0", Role.DECODE, CONFIG), receiving)
        await asyncio.gather(prefill.start(), decode.start())
        try:
            assert not await asyncio.to_thread(join, sending, receiving)
            await served(prefill, decode, "first", FIRST)  # its first block is block 0, in the prefix cache now
            reservation = await decode.reserve(DecodeTask("aborted", ABORTED, SAMPLING, Owner(ROUTER, "aborted"),
                                                          "prefill-0"))
            peers.hold = True
            await decode.abort("aborted", ROUTER)  # its client went away before the KV was announced
            await prefill.prefill(PrefillTask("aborted", ABORTED, SAMPLING, "decode-0", reservation.tag))
            await asyncio.sleep(0.3)  # the sender's notice reaches the decode worker before the announcement
            peers.hold = False
            for announcement in peers.held:
                await decode.announce(announcement)  # discarded
            await asyncio.sleep(0.5)
            return await served(prefill, decode, "last", LAST)  # reads the prefix's blocks, block 0 first
        finally:
            await stop(prefill, decode)

    assert asyncio.run(go()) == expected
