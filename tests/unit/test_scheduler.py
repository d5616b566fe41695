"""Scheduler stepped through whole request lives with a fake worker: batching, chunks, admission, preemption, hooks."""

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerOutput

BS = 4  # tokens per block


def make(num_blocks: int = 12, budget: int = 64, max_seqs: int = 8,
         caching: bool = False) -> tuple[BlockManager, Scheduler]:
    """Prefix caching off by default: these tests follow blocks without it (test_prefix_caching has it on)."""
    blocks = BlockManager(num_blocks, BS, caching)
    return blocks, Scheduler(blocks, max_num_batched_tokens=budget, max_num_seqs=max_seqs)


def req(order: int, prompt_len: int, max_tokens: int = 4, prefill_only: bool = False) -> Request:
    prompt = [100 * order + k for k in range(prompt_len)]
    return Request(f"r{order}", prompt, SamplingParams(max_tokens=max_tokens), order, prefill_only=prefill_only)


def fake_token(request: Request) -> int:
    """The 'sampled' token: unique per request and output position, so recomputed chunks can be checked."""
    return 10_000 + 100 * request.arrival_order + len(request.output_token_ids)


def expected_outputs(request: Request) -> list[int]:
    return [10_000 + 100 * request.arrival_order + i for i in range(request.sampling.max_tokens)]


def step(sched: Scheduler, *requests: Request) -> SchedulerOutput:
    """One engine step with a fake worker; finishes requests that reached max_tokens."""
    by_id = {r.request_id: r for r in requests}
    out = sched.schedule()
    assert out.num_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    assert len({c.request_id for c in out.chunks}) == len(out.chunks)
    for chunk in out.chunks:
        request = by_id[chunk.request_id]
        assert chunk.start_pos == request.num_computed_tokens
        assert chunk.token_ids == tuple(request.all_token_ids[chunk.start_pos:chunk.context_len])
        assert chunk.output_index == len(request.output_token_ids)
        assert len(chunk.block_ids) * BS >= chunk.context_len
        sched.advance(chunk, request)
        if chunk.sample:
            request.output_token_ids.append(fake_token(request))
            if len(request.output_token_ids) >= request.sampling.max_tokens:
                sched.finish(request)
    return out


def run_to_end(sched: Scheduler, *requests: Request, max_steps: int = 200) -> list[SchedulerOutput]:
    outs = []
    while sched.has_work:
        outs.append(step(sched, *requests))
        assert len(outs) < max_steps, "scheduler made no progress"
    for request in requests:
        assert request.status is RequestStatus.FINISHED
        assert request.output_token_ids == expected_outputs(request)
        assert request.block_ids == []
    return outs


def ids(out: SchedulerOutput) -> list[str]:
    return [c.request_id for c in out.chunks]


def test_single_request_whole_life():
    blocks, sched = make()
    a = req(0, prompt_len=6, max_tokens=3)
    sched.add(a)
    first = step(sched, a)
    (chunk,) = first.chunks
    assert (chunk.start_pos, len(chunk.token_ids), chunk.sample, chunk.output_index) == (0, 6, True, 0)
    assert len(chunk.block_ids) == 2 and a.status is RequestStatus.RUNNING
    second = step(sched, a)
    (chunk,) = second.chunks
    assert (chunk.token_ids, chunk.start_pos, chunk.output_index) == ((a.output_token_ids[0],), 6, 1)
    run_to_end(sched, a)
    assert blocks.num_used == 0


def test_continuous_batching_new_request_joins_decoding_one():
    blocks, sched = make()
    a, b = req(0, prompt_len=5, max_tokens=6), req(1, prompt_len=3, max_tokens=3)
    sched.add(a)
    step(sched, a)
    step(sched, a)
    assert a.is_decoding
    sched.add(b)
    out = step(sched, a, b)
    assert ids(out) == ["r0", "r1"]
    decode, prefill = out.chunks
    assert (len(decode.token_ids), decode.start_pos, decode.sample) == (1, 6, True)
    assert (len(prefill.token_ids), prefill.start_pos, prefill.sample) == (3, 0, True)
    out = step(sched, a, b)
    assert ids(out) == ["r0", "r1"] and all(len(c.token_ids) == 1 for c in out.chunks)
    run_to_end(sched, a, b)
    assert blocks.num_used == 0


def test_decode_chunks_come_before_prefill_chunks_and_take_budget_first():
    blocks, sched = make(budget=10)
    long = req(0, prompt_len=30, max_tokens=2)
    sched.add(long)
    assert [len(c.token_ids) for c in step(sched, long).chunks] == [10]
    short = req(1, prompt_len=4, max_tokens=3)  # prefilled elsewhere, appended to running after `long`
    assert sched.reserve(short)
    short.num_computed_tokens = 4
    short.output_token_ids.append(fake_token(short))
    sched.commit(short)
    assert sched.running == [long, short]
    out = step(sched, long, short)
    assert ids(out) == ["r1", "r0"]
    assert [len(c.token_ids) for c in out.chunks] == [1, 9]
    assert [c.sample for c in out.chunks] == [True, False]
    run_to_end(sched, long, short)
    assert blocks.num_used == 0


def test_decode_first_shares_budget_with_a_later_prefill():
    blocks, sched = make(budget=10)
    a, b = req(0, prompt_len=3, max_tokens=4), req(1, prompt_len=30, max_tokens=2)
    sched.add(a)
    sched.add(b)
    assert [len(c.token_ids) for c in step(sched, a, b).chunks] == [3, 7]
    out = step(sched, a, b)
    assert ids(out) == ["r0", "r1"]
    assert [len(c.token_ids) for c in out.chunks] == [1, 9]
    run_to_end(sched, a, b)
    assert blocks.num_used == 0


def test_long_prompt_is_chunked_to_the_token_budget():
    blocks, sched = make(budget=8)
    a = req(0, prompt_len=21, max_tokens=2)
    sched.add(a)
    chunks = [step(sched, a).chunks[0] for _ in range(3)]
    assert [len(c.token_ids) for c in chunks] == [8, 8, 5]
    assert [c.start_pos for c in chunks] == [0, 8, 16]
    assert [c.sample for c in chunks] == [False, False, True]
    assert [len(c.block_ids) for c in chunks] == [2, 4, 6]
    assert [c.token_ids for c in chunks] == [tuple(a.prompt_token_ids[i:i + 8]) for i in (0, 8, 16)]
    assert len(a.output_token_ids) == 1
    (decode,) = step(sched, a).chunks
    assert (decode.start_pos, decode.token_ids) == (21, (a.output_token_ids[0],))
    run_to_end(sched, a)
    assert blocks.num_used == 0


def test_max_num_seqs_is_respected():
    blocks, sched = make(max_seqs=2)
    requests = [req(i, prompt_len=3, max_tokens=2) for i in range(4)]
    for r in requests:
        sched.add(r)
    out = step(sched, *requests)
    assert ids(out) == ["r0", "r1"]
    assert [r.request_id for r in sched.waiting] == ["r2", "r3"]
    outs = [out] + run_to_end(sched, *requests)
    assert all(len(o.chunks) <= 2 for o in outs)
    assert {"r2", "r3"} == set(ids(outs[2]))
    assert blocks.num_used == 0


def test_admission_waits_until_blocks_are_free():
    blocks, sched = make(num_blocks=12)
    big, mid, small = req(0, prompt_len=40, max_tokens=2), req(1, prompt_len=12), req(2, prompt_len=4)
    for r in (big, mid, small):
        sched.add(r)
    out = step(sched, big, mid, small)
    assert ids(out) == ["r0"]  # mid needs 3 blocks, 2 are free; small waits behind it (first come first served)
    assert blocks.num_used == 10
    assert [r.status for r in (mid, small)] == [RequestStatus.WAITING] * 2
    out = step(sched, big, mid, small)  # big's decode takes an 11th block, then big finishes
    assert ids(out) == ["r0"] and big.status is RequestStatus.FINISHED
    out = step(sched, big, mid, small)
    assert ids(out) == ["r1", "r2"]
    run_to_end(sched, big, mid, small)
    assert blocks.num_used == 0


def test_preemption_picks_newest_frees_it_and_recomputes_it_later():
    blocks, sched = make(num_blocks=12)
    a, b, c = req(0, 15, max_tokens=3), req(1, 15, max_tokens=3), req(2, 15, max_tokens=4)
    d = req(3, 4, max_tokens=2)
    for r in (a, b, c):
        sched.add(r)
    step(sched, a, b, c)  # 3 x 4 blocks: the cache is full
    assert blocks.num_free == 0
    sched.add(d)
    assert ids(step(sched, a, b, c, d)) == ["r0", "r1", "r2"]  # 17 tokens each now; d waits for a block
    c_outputs = list(c.output_token_ids)
    assert len(c_outputs) == 2

    out = step(sched, a, b, c, d)  # a and b need a 5th block each: c (newest) is preempted
    assert out.preempted == ("r2",)
    assert ids(out) == ["r0", "r1"]
    assert c.status is RequestStatus.WAITING and c not in sched.running
    assert (c.block_ids, c.num_computed_tokens, c.num_preemptions) == ([], 0, 1)
    assert list(sched.waiting) == [c, d]
    assert c.output_token_ids == c_outputs
    assert a.status is b.status is RequestStatus.FINISHED

    out = step(sched, a, b, c, d)
    assert ids(out) == ["r2", "r3"]
    recompute = out.chunks[0]
    assert recompute.token_ids == tuple(c.prompt_token_ids + c_outputs)
    assert (recompute.start_pos, recompute.sample, recompute.output_index) == (0, True, 2)
    run_to_end(sched, a, b, c, d)
    assert c.output_token_ids[:2] == c_outputs
    assert blocks.num_used == 0


def test_newest_request_preempts_itself_when_it_is_the_one_growing():
    blocks, sched = make(num_blocks=4)
    a, b = req(0, prompt_len=6, max_tokens=2), req(1, prompt_len=8, max_tokens=3)
    sched.add(a)
    sched.add(b)
    step(sched, a, b)
    assert blocks.num_free == 0
    out = step(sched, a, b)  # a fits its 2 blocks; b needs a 3rd and is the newest
    assert out.preempted == ("r1",) and ids(out) == ["r0"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    b_outputs = list(b.output_token_ids)
    out = step(sched, a, b)
    assert ids(out) == ["r1"] and out.chunks[0].token_ids == tuple(b.prompt_token_ids + b_outputs)
    run_to_end(sched, a, b)
    assert blocks.num_used == 0


def test_already_scheduled_victim_is_dropped_from_the_step():
    blocks, sched = make(num_blocks=6, budget=8)
    a = req(0, prompt_len=20, max_tokens=2)
    sched.add(a)
    step(sched, a)
    c = req(1, prompt_len=4, max_tokens=5)
    assert sched.reserve(c)
    c.num_computed_tokens = 4
    c.output_token_ids.append(fake_token(c))
    sched.commit(c)
    assert ids(step(sched, a, c)) == ["r1", "r0"]
    assert blocks.num_free == 0
    out = step(sched, a, c)  # c's decode is scheduled first, then a's last chunk needs c's blocks
    assert out.preempted == ("r1",) and ids(out) == ["r0"]
    assert out.num_tokens == 5
    assert sched.waiting[0] is c and c.block_ids == []
    run_to_end(sched, a, c)
    assert blocks.num_used == 0


def test_hold_keeps_blocks_until_finished():
    blocks, sched = make()
    p = req(0, prompt_len=6, max_tokens=5, prefill_only=True)
    sched.add(p)
    (chunk,) = sched.schedule().chunks
    sched.advance(chunk, p)
    assert chunk.sample
    p.output_token_ids.append(fake_token(p))
    sched.hold(p)
    assert p.status is RequestStatus.HELD and sched.held == {"r0": p}
    assert p not in sched.running and not sched.has_work
    assert len(p.block_ids) == 2 and blocks.num_used == 2
    assert sched.schedule().chunks == ()
    sched.finish(p)  # the engine's release
    assert p.status is RequestStatus.FINISHED and sched.held == {}
    assert blocks.num_used == 0


def test_held_blocks_count_against_admission():
    blocks, sched = make(num_blocks=4)
    p = req(0, prompt_len=12, prefill_only=True)
    sched.add(p)
    step(sched, p)
    sched.hold(p)
    other = req(1, prompt_len=8, max_tokens=2)
    sched.add(other)
    assert sched.schedule().chunks == ()
    sched.finish(p)
    run_to_end(sched, other)
    assert blocks.num_used == 0


def test_reserve_and_commit_then_decode():
    blocks, sched = make(num_blocks=12)
    r = req(0, prompt_len=10, max_tokens=3)
    assert sched.reserve(r)
    assert r.status is RequestStatus.HELD and len(r.block_ids) == 3 and blocks.num_used == 3
    assert not sched.has_work
    too_big = req(1, prompt_len=40)
    assert not sched.reserve(too_big)
    assert too_big.block_ids == [] and "r1" not in sched.held and blocks.num_used == 3
    r.num_computed_tokens = 10  # the KV arrived; the first token came with it
    r.output_token_ids.append(fake_token(r))
    sched.commit(r)
    assert r.status is RequestStatus.RUNNING and sched.held == {}
    (chunk,) = step(sched, r).chunks
    assert (chunk.token_ids, chunk.start_pos, chunk.sample, chunk.output_index) == ((r.output_token_ids[0],), 10,
                                                                                    True, 1)
    run_to_end(sched, r)
    assert blocks.num_used == 0


def test_a_reservation_waits_while_a_preempted_request_waits():
    """Blocks freed on a decode worker go to the requests it preempted before new reservations: otherwise a stream of
    small new prompts takes every freed block and a preempted request waits for as long as the stream lasts."""
    blocks, sched = make(num_blocks=4)
    a, b = req(0, prompt_len=6, max_tokens=2), req(1, prompt_len=8, max_tokens=3)
    sched.add(a)
    sched.add(b)
    step(sched, a, b)
    assert step(sched, a, b).preempted == ("r1",)
    assert a.status is RequestStatus.FINISHED and list(sched.waiting) == [b] and blocks.num_free == 4
    c = req(2, prompt_len=4, max_tokens=2)
    assert not sched.reserve(c)  # a block is free for c, but b came first
    assert c.block_ids == [] and "r2" not in sched.held and blocks.num_free == 4
    assert ids(step(sched, b)) == ["r1"]  # b is recomputed
    assert sched.reserve(c) and c.status is RequestStatus.HELD
    sched.finish(c)
    run_to_end(sched, b)
    assert blocks.num_used == 0


def test_finish_mid_prefill_and_while_waiting_frees_everything():
    blocks, sched = make(budget=8)
    a, b = req(0, prompt_len=20), req(1, prompt_len=4)
    sched.add(a)
    sched.add(b)
    assert ids(step(sched, a, b)) == ["r0"]
    assert blocks.num_used == 2
    sched.finish(a)
    sched.finish(b)
    assert not sched.has_work and not sched.waiting
    assert a.status is b.status is RequestStatus.FINISHED
    assert blocks.num_used == 0
