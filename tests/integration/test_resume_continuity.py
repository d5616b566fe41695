"""A resumed request goes on as if never interrupted (`Engine.add_request(resumed_tokens=...)`, what a migration
sends): on SmolLM2, a request cut after k tokens and resumed from its prompt plus those k tokens gives the same
token ids and the same text deltas, joined, as the uninterrupted run; seeded sampling continues at the same output
positions; a stop string that spans the cut still stops it; a character split across tokens at the cut comes out
whole. (Before, the text held back at the cut was lost, a spanning stop string was missed, and seeded tokens
after the cut differed.)"""

import pytest

from pdserve.engine import Message, Prompt, SamplingParams
from pdserve.engine.request import FinishReason

pytestmark = pytest.mark.model

PROMPT = Prompt(messages=(Message("user", "Write three sentences about lighthouses."),))


def outputs(engine, token_ids: list[int], sampling: SamplingParams, resumed_tokens: int = 0) -> list:
    """Every step output of one request run alone to its end."""
    request_id = f"r-{len(token_ids)}-{resumed_tokens}-{sampling.seed}-{sampling.stop}"
    engine.add_request(request_id, token_ids, sampling, resumed_tokens=resumed_tokens)
    found = []
    while not found or found[-1].finish_reason is None:
        found += [o for o in engine.step() if o.request_id == request_id]
    return found


def client_view(pieces: list) -> tuple[list[int], str, FinishReason]:
    """What a client gets from these outputs: token ids, text deltas joined, finish reason."""
    return [t for o in pieces for t in o.new_token_ids], "".join(o.text_delta for o in pieces), pieces[-1].finish_reason


def cut_and_resumed(engine, prompt_ids: list[int], sampling: SamplingParams, k: int):
    """The client got the first k outputs of a run, then its worker failed: the rest comes from a request resumed
    from the prompt and those k tokens (as `router.migration` sends it). What the client gets in all."""
    head = outputs(engine, prompt_ids, sampling)[:k]
    sent = [t for o in head for t in o.new_token_ids]
    rest = SamplingParams(**{**sampling.__dict__, "max_tokens": sampling.max_tokens - k})
    tail = outputs(engine, prompt_ids + sent, rest, resumed_tokens=k)
    return client_view(head + tail)


@pytest.mark.parametrize("sampling", [SamplingParams(max_tokens=40, temperature=0),
                                      SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=1234)],
                         ids=["greedy", "seeded"])
def test_resumed_output_equals_uninterrupted_output_in_tokens_and_text(engine, sampling):
    prompt_ids = engine.tokenize(PROMPT)
    uninterrupted = client_view(outputs(engine, prompt_ids, sampling))
    assert len(uninterrupted[0]) == 40
    for k in (1, 7, 23):
        assert cut_and_resumed(engine, prompt_ids, sampling, k) == uninterrupted, k


def test_a_stop_string_spanning_the_cut_still_stops_the_output(engine):
    prompt_ids = engine.tokenize(PROMPT)
    k = 12
    pieces = outputs(engine, prompt_ids, SamplingParams(max_tokens=40, temperature=0))
    before = len("".join(o.text_delta for o in pieces[:k]))
    text = client_view(pieces)[1]
    stop = text[before - 3:before + 3]  # three characters either side of the cut
    assert len(stop) == 6
    sampling = SamplingParams(max_tokens=40, temperature=0, stop=(stop,))
    uninterrupted = client_view(outputs(engine, prompt_ids, sampling))
    assert uninterrupted[2] == FinishReason.STOP and stop not in uninterrupted[1]
    assert cut_and_resumed(engine, prompt_ids, sampling, k) == uninterrupted


def test_a_bad_resumed_count_is_refused_naming_it(engine):
    with pytest.raises(ValueError, match="resumed_tokens"):
        engine.add_request("bad-resume", [1, 2, 3], SamplingParams(max_tokens=2), resumed_tokens=3)
