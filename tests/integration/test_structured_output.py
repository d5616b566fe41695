"""Structured output on the real SmolLM2 engine (`engine.grammar_state`): every output of every kind parses and
matches its spec, greedy and sampled; a request resumed from some of its tokens (as after a migration, or on the
decode worker after the prefill worker's first token) goes on exactly as the uninterrupted one; the grammar wins over
`min_tokens`; rows without a grammar in the same batch are untouched."""

import json
import re

import jsonschema
import pytest

from pdserve.engine import SamplingParams
from pdserve.engine.engine import RequestError
from pdserve.engine.request import FinishReason, Message, Prompt
from pdserve.engine.structured_output import GuideKind, StructuredOutput

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pet": {"enum": ["cat", "dog", "none"]}}}
ASK_PERSON = Prompt(messages=(Message("user", "Describe a person as JSON with name, age and pet."),))


def matches_json_schema(text: str, schema: dict) -> bool:
    jsonschema.validate(json.loads(text), schema)
    return True


CASES = [
    (StructuredOutput(GuideKind.JSON, json.dumps(PERSON)), ASK_PERSON, lambda t: matches_json_schema(t, PERSON)),
    (StructuredOutput(GuideKind.JSON_OBJECT), ASK_PERSON, lambda t: isinstance(json.loads(t), dict)),
    (StructuredOutput(GuideKind.REGEX, r"[0-9]{3}-[a-z]{2,6}"), Prompt(text="A product code: "),
     lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,6}", t) is not None),
    (StructuredOutput(GuideKind.CHOICE, choices=("positive", "negative", "neutral")),
     Prompt(messages=(Message("user", "Is 'what a lovely day' positive, negative or neutral?"),)),
     lambda t: t in ("positive", "negative", "neutral")),
    (StructuredOutput(GuideKind.GRAMMAR, 'root ::= "(" num (" + " num)? (" + " num)? ")"\nnum ::= [1-9] [0-9]?'),
     Prompt(text="A sum in brackets: "), lambda t: re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?){0,2}\)", t)),
    (StructuredOutput(GuideKind.GRAMMAR, 'start: "SELECT " COL " FROM t"\nCOL: /[a-z]{1,8}/'),
     Prompt(text="SQL: "), lambda t: re.fullmatch(r"SELECT [a-z]{1,8} FROM t", t)),
]


@pytest.mark.parametrize("structured, prompt, check", CASES, ids=[c[0].kind.value for c in CASES])
def test_every_output_parses_and_matches_its_spec_greedy_and_sampled(engine, structured, prompt, check):
    params = [SamplingParams(max_tokens=128, temperature=0, structured_output=structured)]
    params += [SamplingParams(max_tokens=128, temperature=0.7, seed=seed, structured_output=structured)
               for seed in range(4)]
    for output, p in zip(engine.generate([prompt] * len(params), params), params):
        assert output.finish_reason is FinishReason.STOP, (p.seed, output.text)
        assert check(output.text), (p.seed, output.text)
    assert engine.num_requests == 0


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 11)])
def test_a_resumed_request_continues_exactly_where_its_tokens_left_off(engine, temperature, seed):
    structured = StructuredOutput(GuideKind.JSON, json.dumps(PERSON))
    sampling = SamplingParams(max_tokens=80, temperature=temperature, seed=seed, structured_output=structured)
    (whole,) = engine.generate([ASK_PERSON], sampling)
    prompt = engine.tokenize(ASK_PERSON)
    for cut in (1, len(whole.token_ids) // 2):
        engine.add_request("resumed", [*prompt, *whole.token_ids[:cut]], sampling, resumed_tokens=cut)
        outputs = []
        while not outputs or not outputs[-1].finished:
            outputs += engine.step()
        assert list(whole.token_ids[:cut]) + list(outputs[-1].token_ids) == list(whole.token_ids)
        assert outputs[-1].finish_reason is FinishReason.STOP


def test_resumed_tokens_that_break_the_grammar_are_refused(engine):
    sampling = SamplingParams(max_tokens=8, structured_output=StructuredOutput(GuideKind.REGEX, "[0-9]+"))
    letters = engine.tokenize(Prompt(text="abc"))
    with pytest.raises(RequestError, match="^structured_output.regex: the output so far does not follow it"):
        engine.add_request("broken", [*engine.tokenize(Prompt(text="Digits: ")), *letters], sampling,
                           resumed_tokens=len(letters))
    assert engine.num_requests == 0


def test_the_grammar_wins_over_min_tokens_and_other_rows_are_untouched(engine):
    choice = StructuredOutput(GuideKind.CHOICE, choices=("yes", "no"))
    free = Prompt(text="The capital of France is")
    (alone,) = engine.generate([free], SamplingParams(max_tokens=12, temperature=0))
    guided, plain = engine.generate([Prompt(text="Answer yes or no:"), free], [
        SamplingParams(max_tokens=12, temperature=0, min_tokens=8, structured_output=choice),
        SamplingParams(max_tokens=12, temperature=0)])
    assert guided.text in ("yes", "no") and guided.finish_reason is FinishReason.STOP
    assert plain.token_ids == alone.token_ids
