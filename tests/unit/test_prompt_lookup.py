"""Prompt lookup (`engine.prompt_lookup`) and the scheduler's speculative chunks, without a model: proposals copied
from the latest earlier occurrence of the last n-gram; verification keeps the proposals the model agrees with plus
its own pick; a speculative chunk is the last token plus the proposals, and only accepted KV counts as computed."""

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import SpeculativeSettings
from pdserve.engine.prompt_lookup import pause_after, propose, verify
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler


def test_proposals_follow_the_latest_earlier_occurrence_of_the_longest_tail():
    assert propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3], k=3) == (7, 8, 5)  # the later "1 2 3"
    assert propose([5, 6, 1, 4, 4, 2, 6, 1], k=2) == (4, 4)  # "6 1" again
    assert propose([1, 2, 3, 4, 2, 3], k=4) == (4, 2, 3)  # "2 3" matches; what follows runs to the end
    assert propose([1, 2, 3, 4, 3], k=4) == ()  # a single token matching is chance: not proposed
    assert propose([1, 2, 3, 4, 3], k=4, min_ngram=1) == (4, 3)
    assert propose([1, 2, 3], k=4) == () and propose([7], k=4) == () and propose([1, 1, 1], k=0) == ()


def test_a_request_whose_proposals_miss_waits_longer_each_time():
    assert [pause_after(m) for m in range(7)] == [0, 0, 1, 3, 7, 15, 15]


def test_verify_keeps_agreed_proposals_and_adds_the_models_own_pick():
    assert verify((4, 5, 6), (4, 5, 6, 7)) == (4, 5, 6, 7)  # all accepted, plus the bonus token
    assert verify((4, 5, 6), (4, 9, 6, 7)) == (4, 9)  # the model picks 9 where 5 was proposed
    assert verify((4, 5, 6), (8, 5, 6, 7)) == (8,)  # nothing accepted: one token, as without speculation


def test_a_decoding_request_gets_a_speculative_chunk_and_keeps_only_accepted_kv():
    blocks = BlockManager(16, 4, False)
    sched = Scheduler(blocks, 64, 4, SpeculativeSettings(method="prompt_lookup", k=3, max_batch=1))
    prompt = (1, 2, 3, 9, 1, 2)
    request = Request("r", prompt, SamplingParams(max_tokens=10, temperature=0), 0, speculative=True)
    sched.add(request)
    (chunk,) = sched.schedule().chunks  # the prefill
    sched.advance(chunk, request)
    request.output_token_ids.append(3)  # the sequence ends "1 2 3" as it began
    (chunk,) = sched.schedule().chunks
    assert chunk.proposed == (9, 1, 2) and chunk.token_ids == (3, 9, 1, 2) and chunk.start_pos == 6
    assert len(request.block_ids) * 4 >= chunk.context_len
    request.output_token_ids += [9, 5]  # the model agreed with 9, then picked 5
    sched.advance(chunk, request, computed=chunk.start_pos + 2)
    assert request.num_computed_tokens == 8 and request.num_uncomputed == 1 and request.is_decoding


def test_no_speculation_past_max_batch_or_for_requests_that_do_not_speculate():
    blocks = BlockManager(32, 4, False)
    sched = Scheduler(blocks, 64, 4, SpeculativeSettings(method="prompt_lookup", k=3, max_batch=1))
    requests = [Request(f"r{i}", (1, 2, 1, 2), SamplingParams(max_tokens=10), i, speculative=True) for i in range(2)]
    for r in requests:
        sched.add(r)
    for chunk in sched.schedule().chunks:
        sched.advance(chunk, requests[int(chunk.request_id[1])])
    for r in requests:
        r.output_token_ids.append(1)
        assert r.status is RequestStatus.RUNNING
    assert all(c.proposed == () for c in sched.schedule().chunks)  # two decode: beyond max_batch 1


def test_a_drafts_proposals_count_against_the_steps_token_budget():
    blocks = BlockManager(32, 4, False)
    sched = Scheduler(blocks, 8, 4, SpeculativeSettings(method="draft", k=4, max_batch=4, adaptive=False))
    requests = [Request(f"r{i}", (1, 2, 3), SamplingParams(max_tokens=20, temperature=0), i, speculative=True)
                for i in range(2)]
    for r in requests:
        assert sched.reserve(r)
        r.num_computed_tokens = 3
        r.output_token_ids.append(7)
        sched.commit(r)
    out = sched.schedule()
    assert [c.draft_tokens for c in out.chunks] == [4, 2]  # 1 + 4 rows, then the 3 rows left of 8
    assert out.num_tokens == 8 == sched.max_num_batched_tokens
