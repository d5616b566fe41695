"""Logprobs in OpenAI's shapes, from the `TokenLogprobs` the workers report (the model's own logprobs, before
penalties, temperature and the filters: `engine.logprobs`).

    chat:         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
    completions:  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}], "text_offset": [...]}

A token is shown as its own text (decoded alone; a piece of a multi-byte character shows as U+FFFD, as in vLLM), or
as "token_id:<id>" without a tokenizer. A completion's `text_offset` counts characters from the start of the choice's
text, token by token, across the chunks of a stream (`CompletionOffsets`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pdserve.engine.logprobs import TokenLogprobs
from pdserve.engine.tokenizer import Tokenizer


class LogprobShapes:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id]) if self._tokenizer is not None else f"token_id:{token_id}"
            self._texts[token_id] = text
        return text

    def chat(self, logprobs: Sequence[TokenLogprobs]) -> dict[str, Any]:
        return {"content": [{**self._entry(p.token_id, p.logprob),
                             "top_logprobs": [self._entry(t, value) for t, value in p.top]} for p in logprobs]}

    def completion(self, logprobs: Sequence[TokenLogprobs], offset: int) -> tuple[dict[str, Any], int]:
        """The shape for these tokens, whose text starts `offset` characters into the choice; and the offset after
        them."""
        tokens, offsets = [], []
        for p in logprobs:
            tokens.append(self.token(p.token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        body = {"tokens": tokens, "token_logprobs": [p.logprob for p in logprobs],
                "top_logprobs": [{self.token(t): value for t, value in p.top} for p in logprobs],
                "text_offset": offsets}
        return body, offset

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


class CompletionOffsets:
    """Each choice's running `text_offset` over a stream's chunks."""

    def __init__(self, shapes: LogprobShapes) -> None:
        self._shapes = shapes
        self._offsets: dict[int, int] = {}

    def shape(self, index: int, logprobs: Sequence[TokenLogprobs]) -> dict[str, Any]:
        body, self._offsets[index] = self._shapes.completion(logprobs, self._offsets.get(index, 0))
        return body
