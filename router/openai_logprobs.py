"""Logprobs in OpenAI's shapes, from the `TokenLogprobs` the workers report (the model's own logprobs, before
penalties, temperature and the filters: `engine.logprobs`).

    chat:         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
    completions:  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}], "text_offset": [...]}

With `echo` (completions) the prompt's tokens come first, the first of them with no logprob (null), as OpenAI and
vLLM show them; vLLM's `prompt_logprobs` is a list with null first, then per prompt token a map from token id to
{"logprob", "decoded_token"} (the token itself and its alternatives).

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

    def decode(self, token_ids: Sequence[int]) -> str:
        """A prompt's text from its token ids ("" without a tokenizer)."""
        return self._tokenizer.decode(list(token_ids)) if self._tokenizer is not None else ""

    def token(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id]) if self._tokenizer is not None else f"token_id:{token_id}"
            self._texts[token_id] = text
        return text

    def chat(self, logprobs: Sequence[TokenLogprobs]) -> dict[str, Any]:
        return {"content": [{**self._entry(p.token_id, p.logprob),
                             "top_logprobs": [self._entry(t, value) for t, value in p.top]} for p in logprobs]}

    def completion(self, logprobs: Sequence[TokenLogprobs], offset: int,
                   prompt: Sequence[TokenLogprobs | None] | None = None,
                   prompt_ids: Sequence[int] = ()) -> tuple[dict[str, Any], int]:
        """The shape for these tokens, whose text starts `offset` characters into the choice (after the echoed
        prompt's, `prompt` one entry per token of `prompt_ids`, when given); and the offset after them."""
        entries: list[TokenLogprobs | None] = [*(prompt or ()), *logprobs]
        ids = [*(prompt_ids if prompt is not None else ()), *(p.token_id for p in logprobs)]
        tokens, offsets = [], []
        for token_id in ids:
            tokens.append(self.token(token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        body = {"tokens": tokens, "token_logprobs": [p.logprob if p is not None else None for p in entries],
                "top_logprobs": [{self.token(t): value for t, value in p.top} if p is not None else None
                                 for p in entries],
                "text_offset": offsets}
        return body, offset

    def prompt(self, entries: Sequence[TokenLogprobs | None]) -> list[dict[str, Any] | None]:
        """vLLM's `prompt_logprobs`: per prompt token, its own logprob and its alternatives', by token id."""
        shaped = []
        for p in entries:
            if p is None:
                shaped.append(None)
                continue
            shaped.append({str(t): {"logprob": value, "decoded_token": self.token(t)}
                           for t, value in ((p.token_id, p.logprob), *p.top)})
        return shaped

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


class CompletionOffsets:
    """Each choice's running `text_offset` over a stream's chunks."""

    def __init__(self, shapes: LogprobShapes) -> None:
        self._shapes = shapes
        self._offsets: dict[int, int] = {}

    def shape(self, index: int, logprobs: Sequence[TokenLogprobs],
              prompt: Sequence[TokenLogprobs | None] | None = None, prompt_ids: Sequence[int] = ()) -> dict[str, Any]:
        body, self._offsets[index] = self._shapes.completion(logprobs, self._offsets.get(index, 0), prompt,
                                                             prompt_ids)
        return body
