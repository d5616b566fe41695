"""Incremental detokenization and stop conditions for one request's output.

Text is produced as deltas: the last few tokens are decoded together so that multi-token characters and
byte-level merges come out whole, and a delta is held back while it ends in an incomplete UTF-8 sequence. Stop
strings are searched in the text as it grows; the output text ends just before the first match.
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
        self.sampling = sampling
        self.stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(eos_token_ids))
        self.tokens: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> tuple[str, Finish | None]:
        """Take one new output token; return the text it adds and whether the request is now finished."""
        if token_id in self.stop_ids:
            return self._flush(), Finish(FinishReason.STOP, token_id)
        self.tokens.append(token_id)
        delta = self._decode_delta()
        stop = self._find_stop(len(delta))
        if stop is not None:
            index, string = stop
            kept = max(0, index - (len(self.text) - len(delta)))
            self.text = self.text[:index]
            return delta[:kept], Finish(FinishReason.STOP, string)
        return delta, None

    def finish_length(self) -> str:
        """The request ended by length: return any text still held back."""
        return self._flush()

    def _decode_delta(self) -> str:
        if self.tokenizer is None:
            return ""
        prefix = self.tokenizer.decode(self.tokens[self._prefix_offset:self._read_offset])
        full = self.tokenizer.decode(self.tokens[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.tokens)
        self.text += delta
        return delta

    def _flush(self) -> str:
        if self.tokenizer is None or self._read_offset == len(self.tokens):
            return ""
        prefix = self.tokenizer.decode(self.tokens[self._prefix_offset:self._read_offset])
        delta = self.tokenizer.decode(self.tokens[self._prefix_offset:])[len(prefix):]
        self._read_offset = len(self.tokens)
        self.text += delta
        return delta

    def _find_stop(self, delta_len: int) -> tuple[int, str] | None:
        """The earliest stop string that the newest text completes: (index in text, string)."""
        best: tuple[int, str] | None = None
        for string in self.sampling.stop:
            start = max(0, len(self.text) - delta_len - len(string) + 1)
            index = self.text.find(string, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, string)
        return best
