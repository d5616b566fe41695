"""Detokenizer with a fake byte-level tokenizer: deltas, held-back UTF-8, EOS / stop ids, ignore_eos, stop strings."""

from pdserve.engine.detokenizer import Detokenizer
from pdserve.engine.request import FinishReason
from pdserve.engine.sampling_params import SamplingParams

EOS = 256
STOP_ID = 257


class ByteTokenizer:
    """Ids 0..255 are single bytes, EOS and STOP_ID are special (decode to nothing), 300+ are multi-byte pieces."""

    def __init__(self, pieces: tuple[bytes, ...] = ()) -> None:
        self.vocab = {i: bytes([i]) for i in range(256)} | {EOS: b"", STOP_ID: b""}
        self.vocab |= {300 + i: piece for i, piece in enumerate(pieces)}

    def decode(self, ids) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


def byte_ids(text: str) -> list[int]:
    return list(text.encode())


def piece_ids(tokenizer: ByteTokenizer, *pieces: str) -> list[int]:
    by_piece = {v: k for k, v in tokenizer.vocab.items() if k >= 300}
    return [by_piece[p.encode()] for p in pieces]


def feed(detok: Detokenizer, ids: list[int]):
    """Add tokens until one finishes the request: (deltas, finish or None)."""
    deltas = []
    for token in ids:
        delta, finish = detok.add(token)
        deltas.append(delta)
        if finish is not None:
            return deltas, finish
    return deltas, None


def make(sampling: SamplingParams | None = None, pieces: tuple[str, ...] = ()) -> Detokenizer:
    tokenizer = ByteTokenizer(tuple(p.encode() for p in pieces))
    return Detokenizer(tokenizer, sampling or SamplingParams(), eos_token_ids=(EOS,))


def test_deltas_concatenate_to_the_full_text():
    text = "héllo wörld, 日本語 ok 🙂!"
    detok = make()
    deltas, finish = feed(detok, byte_ids(text))
    assert finish is None
    assert "".join(deltas) == detok.text == text
    assert not any("\ufffd" in d for d in deltas)


def test_multi_byte_pieces_concatenate_too():
    pieces = ("Hel", "lo", " wo", "rld")
    detok = make(pieces=pieces)
    deltas, _ = feed(detok, piece_ids(detok.tokenizer, *pieces))
    assert deltas == list(pieces) and detok.text == "Hello world"


def test_incomplete_utf8_is_held_back_and_released_whole():
    detok = make()
    a, b, c = "日".encode()
    assert detok.add(ord("x")) == ("x", None)
    assert detok.add(a) == ("", None)
    assert detok.add(b) == ("", None)
    assert detok.text == "x"
    assert detok.add(c) == ("日", None)
    assert detok.add(ord("y")) == ("y", None)
    assert detok.text == "x日y"


def test_length_finish_releases_held_back_text():
    detok = make()
    detok.tokenizer.vocab[400] = b"ab\xc3"  # ends in the first byte of a two-byte character
    assert detok.add(400) == ("", None)
    assert detok.flush() == "ab\ufffd"
    assert detok.flush() == ""


def test_eos_finishes_with_stop_and_adds_no_text():
    detok = make()
    feed(detok, byte_ids("hi"))
    delta, finish = detok.add(EOS)
    assert delta == ""
    assert (finish.reason, finish.stop_reason) == (FinishReason.STOP, EOS)
    assert detok.text == "hi"


def test_stop_token_id_finishes_even_for_an_ordinary_token():
    detok = make(SamplingParams(stop_token_ids=(ord("!"),)))
    deltas, finish = feed(detok, byte_ids("hey!there"))
    assert (finish.reason, finish.stop_reason) == (FinishReason.STOP, ord("!"))
    assert "".join(deltas) == detok.text == "hey"


def test_ignore_eos_keeps_going_but_stop_token_ids_still_stop():
    detok = make(SamplingParams(ignore_eos=True, stop_token_ids=(STOP_ID,)))
    deltas, finish = feed(detok, byte_ids("a") + [EOS] + byte_ids("b") + [EOS, STOP_ID] + byte_ids("c"))
    assert (finish.reason, finish.stop_reason) == (FinishReason.STOP, STOP_ID)
    assert "".join(deltas) == detok.text == "ab"


def test_stop_string_inside_one_delta_returns_only_the_text_before_it():
    detok = make(SamplingParams(stop=(".",)), pieces=("Hi", " there. Bye"))
    deltas, finish = feed(detok, piece_ids(detok.tokenizer, "Hi", " there. Bye"))
    assert deltas == ["Hi", " there"]
    assert (finish.reason, finish.stop_reason) == (FinishReason.STOP, ".")
    assert detok.text == "Hi there"


def test_stop_string_spanning_two_tokens_truncates_text_before_it():
    detok = make(SamplingParams(stop=("lo w",)), pieces=("Hello", " world"))
    deltas, finish = feed(detok, piece_ids(detok.tokenizer, "Hello", " world"))
    assert (finish.reason, finish.stop_reason) == (FinishReason.STOP, "lo w")
    assert detok.text == "Hel"
    assert len(deltas) == 2  # finished on the second token


def test_stop_string_spanning_held_back_bytes_returns_only_the_part_before_it():
    detok = make(SamplingParams(stop=("é!",)))
    e1, e2 = "é".encode()
    detok.tokenizer.vocab[400] = b"ab" + bytes([e1])
    detok.tokenizer.vocab[401] = bytes([e2]) + b"!cd"
    assert detok.add(400) == ("", None)
    delta, finish = detok.add(401)
    assert delta == "ab" and detok.text == "ab"
    assert (finish.reason, finish.stop_reason) == (FinishReason.STOP, "é!")


def test_earliest_of_several_stop_strings_wins():
    detok = make(SamplingParams(stop=("world", "lo")), pieces=("Hello world",))
    deltas, finish = feed(detok, piece_ids(detok.tokenizer, "Hello world"))
    assert finish.stop_reason == "lo" and detok.text == "Hel" and deltas == ["Hel"]


def test_earliest_stop_string_wins_across_tokens():
    detok = make(SamplingParams(stop=("cd", "b")))
    deltas, finish = feed(detok, byte_ids("abcd"))
    assert finish.stop_reason == "b" and detok.text == "a" and "".join(deltas) == "a"


def test_without_tokenizer_there_is_no_text_but_eos_still_stops():
    detok = Detokenizer(None, SamplingParams(stop=("a",)), eos_token_ids=(EOS,))
    assert detok.add(ord("a")) == ("", None)
    delta, finish = detok.add(EOS)
    assert (delta, finish.reason, detok.text) == ("", FinishReason.STOP, "")


def test_streamed_deltas_equal_final_text_when_a_stop_string_spans_tokens():
    detok = make(SamplingParams(stop=("lo w",)), pieces=("Hello", " world"))
    deltas, finish = feed(detok, piece_ids(detok.tokenizer, "Hello", " world"))
    assert finish is not None
    assert "".join(deltas) == detok.text == "Hel"
