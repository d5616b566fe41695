"""Structured output: what a request's output must match (a JSON schema, any JSON object, a regular expression, one
of a list of strings, or a grammar), and its check at the boundary.

The grammar engine is llguidance (guidance-ai; vLLM, SGLang and llama.cpp use it too). Of the three made for this
it is the one we take because it needs nothing beyond its own 3 MB wheel (xgrammar brings triton and a TVM runtime;
outlines-core builds an index over the whole vocabulary per regex before the first token), it builds each mask
lazily in tens of microseconds on a CPU (`bench/structured_overhead.py`), it reads JSON schema, regex, Lark and GBNF,
and every step is bounded ("fuel"), so no grammar can hang a worker.

A `StructuredOutput` is checked when it is made: an invalid schema, regex or grammar raises `StructuredOutputError`
naming the field, so the router answers 400 before any worker sees the request. The per-request state that masks
the logits lives in `engine.grammar_state`.
"""

from __future__ import annotations

import enum
import functools
import json
from dataclasses import dataclass

from pdserve.engine.sampling_params import SamplingError

MAX_SPEC_CHARS = 1_000_000
"""A schema, regex or grammar longer than this is refused (the request body limit bounds it anyway)."""


class StructuredOutputError(SamplingError):
    """The spec cannot be compiled; the message names the field and says why."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


class GuideKind(enum.Enum):
    JSON = "json"
    """`spec` is a JSON schema (text)."""
    JSON_OBJECT = "json_object"
    """Any JSON object; `spec` is empty."""
    REGEX = "regex"
    """`spec` is a regular expression (Rust regex syntax, as llguidance reads it); the whole output matches it."""
    CHOICE = "choice"
    """The output is exactly one of `choices`."""
    GRAMMAR = "grammar"
    """`spec` is a Lark grammar (llguidance's dialect) or a GBNF grammar (llama.cpp's; `root ::= ...`)."""


@dataclass(frozen=True)
class StructuredOutput:
    kind: GuideKind
    spec: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.kind, GuideKind):
            raise StructuredOutputError("structured_output", f"unknown kind {self.kind!r}")
        object.__setattr__(self, "choices", tuple(self.choices))
        field = self.field
        if self.kind is GuideKind.CHOICE:
            if not self.choices or any(not isinstance(c, str) or not c for c in self.choices):
                raise StructuredOutputError(field, "must be a non-empty list of non-empty strings")
        elif self.kind is not GuideKind.JSON_OBJECT and (not isinstance(self.spec, str) or not self.spec.strip()):
            raise StructuredOutputError(field, "must not be empty")
        if len(self.spec) + sum(map(len, self.choices)) > MAX_SPEC_CHARS:
            raise StructuredOutputError(field, f"longer than {MAX_SPEC_CHARS} characters")
        self.grammar()  # raises for an invalid spec

    @property
    def field(self) -> str:
        """How error messages name it."""
        return f"structured_output.{self.kind.value}"

    def grammar(self) -> str:
        """The llguidance grammar (compiled once per distinct spec)."""
        return _compile(self.kind, self.spec, self.choices)


@functools.lru_cache(maxsize=256)
def _compile(kind: GuideKind, spec: str, choices: tuple[str, ...]) -> str:
    from llguidance import LLMatcher

    field = f"structured_output.{kind.value}"
    if kind is GuideKind.JSON:
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(field, f"the schema is not valid JSON: {e}") from e
        except RecursionError as e:
            raise StructuredOutputError(field, "the schema is nested too deeply") from e
        if not isinstance(schema, (dict, bool)):
            raise StructuredOutputError(field, f"a JSON schema is an object, got {type(schema).__name__}")
        try:
            grammar = LLMatcher.grammar_from_json_schema(spec)
        except ValueError as e:
            raise StructuredOutputError(field, f"invalid: {e}") from e
    elif kind is GuideKind.JSON_OBJECT:
        grammar = LLMatcher.grammar_from_json_schema('{"type": "object"}')
    elif kind is GuideKind.REGEX:
        grammar = LLMatcher.grammar_from_regex(spec)
    elif kind is GuideKind.CHOICE:
        grammar = LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    else:
        grammar = LLMatcher.grammar_from_lark(_as_lark(spec, field))
    error = LLMatcher.validate_grammar(grammar, None)
    if error:
        raise StructuredOutputError(field, f"invalid: {error.strip()}")
    return grammar


def _as_lark(spec: str, field: str) -> str:
    """A GBNF grammar (it defines `root ::=`) becomes Lark; a Lark one stays as it is."""
    if "::=" not in spec:
        return spec
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return any_to_lark(spec)
    except Exception as e:  # the converter raises plain Exception too (an undefined rule); each is the spec's fault
        raise StructuredOutputError(field, f"not a valid GBNF grammar: {e}") from e
