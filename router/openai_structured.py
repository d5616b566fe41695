"""Structured output as the HTTP API's clients ask for it, to our `StructuredOutput` (`engine.structured_output`).

Three spellings, one meaning; a request uses at most one:

- OpenAI's `response_format`: `{"type": "text"}` (free text), `{"type": "json_object"}`, or
  `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`;
- vLLM's `structured_outputs`: exactly one of `json` (a schema, as an object or text), `regex`, `choice` (a list of
  strings), `grammar` (Lark or GBNF) or `json_object: true`; its backend options only at their neutral values;
- vLLM's older `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`.

An invalid schema, regex or grammar is a 400 naming the field as the client wrote it, before any worker sees it.
"""

from __future__ import annotations

import json
from typing import Any

from pdserve.client import structured_output_message
from pdserve.engine.structured_output import GuideKind, StructuredOutput, StructuredOutputError
from pdserve.proto import generation_pb2 as pb

VLLM_KINDS = {"json": GuideKind.JSON, "regex": GuideKind.REGEX, "choice": GuideKind.CHOICE,
              "grammar": GuideKind.GRAMMAR, "json_object": GuideKind.JSON_OBJECT}
"""vLLM's `structured_outputs` keys that say what the output is."""
VLLM_NEUTRAL_OPTIONS: dict[str, tuple[Any, ...]] = {
    "disable_fallback": (True, False),  # which backend serves it: we have one
    "disable_any_whitespace": (False,),
    "disable_additional_properties": (False,),
    "whitespace_pattern": (),
    "structural_tag": (),
}
"""vLLM's other `structured_outputs` keys, and the values that change nothing here (null always does)."""
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
"""vLLM's older top-level fields, and their `structured_outputs` key."""


class StructuredFieldError(ValueError):
    """A structured-output field is wrong; `field` is its name as the client wrote it."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


def structured_output(response_format: dict[str, Any] | None, structured_outputs: dict[str, Any] | None,
                      guided: dict[str, Any]) -> pb.StructuredOutput | None:
    """The request's structured output (None: free text). `guided`: the `guided_*` fields the body has (not null).
    Raises StructuredFieldError."""
    asked = [(name, spec) for name, spec in (
        ("response_format", _from_response_format(response_format)),
        ("structured_outputs", _from_vllm(structured_outputs, "structured_outputs")),
        *((name, _from_vllm({GUIDED_FIELDS[name]: value}, name)) for name, value in guided.items()),
    ) if spec is not None]
    if len(asked) > 1:
        raise StructuredFieldError(asked[1][0], f"give one structured output, not {' and '.join(n for n, _ in asked)}")
    return structured_output_message(asked[0][1]) if asked else None


def _from_response_format(value: dict[str, Any] | None) -> StructuredOutput | None:
    kind = (value or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(GuideKind.JSON_OBJECT)
    if kind != "json_schema":
        raise StructuredFieldError("response_format.type", f"{kind!r} is not supported (text, json_object or "
                                   "json_schema)")
    described = value.get("json_schema")
    if not isinstance(described, dict) or not isinstance(described.get("schema"), dict):
        raise StructuredFieldError("response_format.json_schema.schema", "required: the JSON schema, an object")
    return _checked("response_format.json_schema.schema", GuideKind.JSON, json.dumps(described["schema"]))


def _from_vllm(value: dict[str, Any] | None, field: str) -> StructuredOutput | None:
    value = {k: v for k, v in (value or {}).items() if v is not None and v is not False}
    for key, v in value.items():
        if key in VLLM_KINDS:
            continue
        if key not in VLLM_NEUTRAL_OPTIONS:
            raise StructuredFieldError(f"{field}.{key}", "unknown key")
        if v not in VLLM_NEUTRAL_OPTIONS[key]:
            raise StructuredFieldError(f"{field}.{key}", "not supported; leave it out")
    kinds = [k for k in value if k in VLLM_KINDS]
    if not kinds:
        return None
    if len(kinds) > 1:
        raise StructuredFieldError(field, f"give one of {', '.join(VLLM_KINDS)}, not {' and '.join(kinds)}")
    key = kinds[0]
    name = field if field in GUIDED_FIELDS else f"{field}.{key}"
    spec = value[key]
    if key == "json_object":
        if spec is not True:
            raise StructuredFieldError(name, "must be true or false")
        return StructuredOutput(GuideKind.JSON_OBJECT)
    if key == "choice":
        if not isinstance(spec, list) or not all(isinstance(c, str) for c in spec):
            raise StructuredFieldError(name, "must be a list of strings")
        return _checked(name, GuideKind.CHOICE, choices=tuple(spec))
    if key == "json" and isinstance(spec, (dict, bool)):
        spec = json.dumps(spec)
    if not isinstance(spec, str):
        raise StructuredFieldError(name, f"must be a string{' or an object' if key == 'json' else ''}")
    return _checked(name, VLLM_KINDS[key], spec)


def _checked(field: str, kind: GuideKind, spec: str = "", choices: tuple[str, ...] = ()) -> StructuredOutput:
    """The spec, compiled once to check it: its errors name `field`."""
    try:
        return StructuredOutput(kind, spec, choices)
    except StructuredOutputError as e:
        raise StructuredFieldError(field, e.why) from e
