"""Prefix caching across a prefill and a decode worker (in this process, KV over the in-process connector, random
SmolLM2-shaped weights): a second turn of a conversation is computed from the prefill worker's cache, and the decode
worker that served the first turn receives only the blocks it lacks, counted in bytes; tokens stay those of an
engine without caching."""

import asyncio
import dataclasses

import pytest

from pdserve.engine import Engine, SamplingParams
from pdserve.engine.prefix_hash import shareable_blocks
from pdserve.worker.messages import DecodeTask, Owner, PrefillTask
from tests.unit.test_workers_in_process import CONFIG, PROMPT, ROUTER, events_until_finished, idle, started_pair, stop

SAMPLING = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
NEW_MESSAGE = tuple(range(300, 330))


@pytest.fixture(scope="module")
def uncached() -> Engine:
    return Engine(dataclasses.replace(CONFIG, prefix_caching=False))


async def turn(prefill, decode, key: str, prompt: tuple[int, ...]):
    """One handed-off request to its end: (reservation, prefill result, output tokens)."""
    reservation = await decode.reserve(DecodeTask(key, prompt, SAMPLING, Owner(ROUTER, key), "prefill-0"))
    result = await prefill.prefill(PrefillTask(key, prompt, SAMPLING, "decode-0", reservation.tag,
                                               reservation.cached_blocks))
    events = await events_until_finished(decode, key)
    return reservation, result, tuple(t for e in events for t in e.token_ids)


def test_a_second_turn_moves_only_the_blocks_the_decode_worker_lacks(uncached):
    async def go():
        prefill, decode = await started_pair()
        block_bytes = decode.runtime.engine.kv_cache.block_bytes
        first = await turn(prefill, decode, "t1", PROMPT)
        received_first = decode.runtime.metrics.transfer_bytes
        second_prompt = PROMPT + first[2] + NEW_MESSAGE  # the history, the reply, a new message
        second = await turn(prefill, decode, "t2", second_prompt)
        received_second = decode.runtime.metrics.transfer_bytes - received_first
        not_sent = prefill.runtime.metrics.kv_bytes_not_sent
        assert await idle(prefill, decode)  # no block held once both turns ended: cached ones are free
        await stop(prefill, decode)
        return block_bytes, first, second, received_first, received_second, not_sent, second_prompt

    block_bytes, first, second, received_first, received_second, not_sent, second_prompt = asyncio.run(go())
    assert first[0].cached_blocks == 0 and received_first == first[0].num_blocks * block_bytes
    # The decode worker computed the reply's KV itself: the history and all but the reply's last token are cached.
    held = (len(PROMPT) + len(first[2]) - 1) // CONFIG.block_size
    assert second[0].cached_blocks == min(held, shareable_blocks(len(second_prompt), CONFIG.block_size)) > 5
    assert received_second == (second[0].num_blocks - second[0].cached_blocks) * block_bytes
    assert not_sent == second[0].cached_blocks * block_bytes
    # The prefill worker had the first prompt's full blocks (it never saw the reply's KV).
    assert second[1].cached_tokens == len(PROMPT) // CONFIG.block_size * CONFIG.block_size
    expected = [o.token_ids for o in uncached.generate([list(PROMPT), list(second_prompt)], SAMPLING)]
    assert [first[2], second[2]] == expected
