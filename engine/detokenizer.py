"""Incremental detokenization and stop conditions for one request's output.

Text is produced as deltas: the last few tokens are decoded together so that multi-token characters and
byte-level merges come out whole, and text is held back while it ends in an incomplete UTF-8 sequence. With stop
strings, the last `len(longest stop) - 1` characters are also held back, since they may be the start of a stop
string that the next token completes; so no part of a stop string is ever streamed. The emitted deltas always join
to `text`, and the output ends just before the first stop string.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.request import FinishReason
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    stop_reason: str | int | None = None


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer | None, sampling: SamplingParams, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = sampling.stop
        self.stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(eos_token_ids))
        self.holdback = max((len(s) for s in sampling.stop), default=1) - 1
        self.tokens: list[int] = []
        self._decoded = ""  # all text decoded so far, including what is held back
        self._sent = 0  # characters of _decoded already emitted
        self._prefix_offset = 0
        self._read_offset = 0

    def replay(self, token_ids: list[int]) -> None:
        """Take output tokens a client already has (a resumed request), emitting nothing: afterwards the text goes on
        exactly as if this detokenizer had produced them, held-back text included, so a stop string that spans the
        resumption point still stops the output, and no character is sent twice or lost."""
        for token_id in token_ids:
            self.add(token_id)

    @property
    def text(self) -> str:
        """The text emitted so far (the deltas joined)."""
        return self._decoded[:self._sent]

    def add(self, token_id: int) -> tuple[str, Finish | None]:
        """Take one new output token; return the text to emit now and whether the request is now finished."""
        if token_id in self.stop_ids:
            return self.flush(), Finish(FinishReason.STOP, token_id)
        self.tokens.append(token_id)
        if self.tokenizer is None:
            return "", None  # token ids only (a sim engine): no text, so no stop string can end it
        new = self._decode_new()
        stop = self._find_stop(len(new))
        if stop is not None:
            index, string = stop
            self._decoded = self._decoded[:index]
            return self.flush(), Finish(FinishReason.STOP, string)
        return self._emit(len(self._decoded) - self.holdback), None

    def flush(self) -> str:
        """The request is ending: emit everything still held back (an incomplete character decodes as U+FFFD)."""
        if self.tokenizer is not None and self._read_offset < len(self.tokens):
            prefix = self.tokenizer.decode(self.tokens[self._prefix_offset:self._read_offset])
            self._decoded += self.tokenizer.decode(self.tokens[self._prefix_offset:])[len(prefix):]
            self._read_offset = len(self.tokens)
        return self._emit(len(self._decoded))

    def _emit(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        delta = self._decoded[self._sent:upto]
        self._sent = upto
        return delta

    def _decode_new(self) -> str:
        if self.tokenizer is None:
            return ""
        prefix = self.tokenizer.decode(self.tokens[self._prefix_offset:self._read_offset])
        full = self.tokenizer.decode(self.tokens[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        new = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.tokens)
        self._decoded += new
        return new

    def _find_stop(self, new_len: int) -> tuple[int, str] | None:
        """The earliest stop string that the newest text completes: (index in the text, string)."""
        best: tuple[int, str] | None = None
        for string in self.stop_strings:
            start = max(0, len(self._decoded) - new_len - len(string) + 1)
            index = self._decoded.find(string, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, string)
        return best
