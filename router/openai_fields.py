"""The rule for request fields of the HTTP API: every field is honoured, or refused with a 400 that names it. None is
silently ignored when it would change the output (issue 23: 27 fields of vLLM's and OpenAI's schemas were taken with
a 200 and ignored, so an invalid regex ran unconstrained to the length limit).

Fields the request models (`openai_protocol`) declare are honoured (or refused there, by name, when set to something
we do not do). Of the rest, a body may carry

- `OUTPUT_NEUTRAL` fields with any value: they never change the output (`user`, `metadata`, ...);
- `NEUTRAL_VALUES` fields at a value that leaves the output as it is (what clients and harnesses send by default,
  e.g. vLLM's `use_beam_search: false` or `repetition_penalty: 1.0`); any other value is refused, naming the field;
- nothing else: an unknown field is refused, naming it (a typo in a field name is a 400, not a silent default).

README's "OpenAI API" table lists each field and what becomes of it.
"""

from __future__ import annotations

import json
from typing import Any

OUTPUT_NEUTRAL = frozenset({
    "user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier",
    "request_id",  # vLLM: the id is ours to give (X-Request-Id names it)
})
"""Fields that never change what is generated: accepted with any value and not acted on."""

NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    # vLLM's sampling extensions
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "bad_words": ([],),
    "logits_processors": ([],),
    "truncate_prompt_tokens": (),
    # vLLM's output shaping
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "include_stop_str_in_output": (False,),
    "return_tokens_as_token_ids": (False,),
    # vLLM's chat extensions
    "echo": (False,),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "chat_template": (),
    "chat_template_kwargs": ({},),
    "documents": ([],),
    # structured output: which engine serves it (we have one)
    "guided_decoding_backend": (),
    # OpenAI's own, for features we do not offer
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "prediction": (),
    "modalities": (["text"],),
    "audio": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "top_logprobs": (0,),  # completions (chat declares it)
}
"""Fields we do not act on, and the values at which that leaves the output as it would be (null always does)."""


def refuse_unhonoured(extra: dict[str, Any] | None) -> None:
    """Raise FieldRefused for the first field of `extra` (the body's undeclared fields) that we would ignore while
    it asks for something."""
    for name, value in (extra or {}).items():
        if name in OUTPUT_NEUTRAL or value is None:
            continue
        if name not in NEUTRAL_VALUES:
            raise FieldRefused(name, "unknown field: not part of the API this server offers")
        if value not in NEUTRAL_VALUES[name] or isinstance(value, bool) != _boolean(NEUTRAL_VALUES[name]):
            raise FieldRefused(name, f"not supported; leave it out{_or_neutral(NEUTRAL_VALUES[name])}")


class FieldRefused(ValueError):
    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


def _boolean(values: tuple[Any, ...]) -> bool:
    return bool(values) and all(isinstance(v, bool) for v in values)


def _or_neutral(values: tuple[Any, ...]) -> str:
    return f" or set it to {json.dumps(values[0])}" if values else ""
