"""Structured output's spec (`engine.structured_output`) and the HTTP API's three spellings of it
(`router.openai_structured`): each becomes the same `StructuredOutput`, on completions and chat; an invalid schema,
regex or grammar, or two spellings at once, is a 400 naming the field as the client wrote it, and no worker sees
the request. On the real app with the fake orchestrator of `test_http_server` (no model)."""

import json

import pytest

from pdserve.engine.structured_output import GuideKind, StructuredOutput, StructuredOutputError

from .test_http_server import CHAT, FakeOrchestrator, assert_error, client_for

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.mark.parametrize("kind, spec, choices, why", [
    (GuideKind.REGEX, "(unclosed", (), "unclosed group"),
    (GuideKind.JSON, "{not json", (), "not valid JSON"),
    (GuideKind.JSON, "[1, 2]", (), "a JSON schema is an object"),
    (GuideKind.JSON, '{"type": "integer", "minimum": 5, "maximum": 2}', (), "Unsatisfiable"),
    (GuideKind.JSON, '{"type": "wizard"}', (), "wizard"),
    (GuideKind.GRAMMAR, "start: ???", (), "invalid"),
    (GuideKind.GRAMMAR, "root ::= undefined_rule", (), "undefined_rule"),
    (GuideKind.CHOICE, "", (), "non-empty list"),
    (GuideKind.CHOICE, "", ("a", ""), "non-empty list"),
    (GuideKind.REGEX, "  ", (), "must not be empty"),
])
def test_an_invalid_spec_is_refused_when_made_naming_its_field(kind, spec, choices, why):
    with pytest.raises(StructuredOutputError) as raised:
        StructuredOutput(kind, spec, choices)
    assert raised.value.field == f"structured_output.{kind.value}"
    assert str(raised.value).startswith(f"structured_output.{kind.value}: ") and why in str(raised.value)


def post(path: str, extra: dict):
    orchestrator = FakeOrchestrator()
    prompt = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    response = client_for(orchestrator).post(path, json={**prompt, "max_tokens": 2, **extra})
    return response, orchestrator


PATHS = ["/v1/completions", "/v1/chat/completions"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("extra, expected", [
    ({"response_format": {"type": "json_object"}}, StructuredOutput(GuideKind.JSON_OBJECT)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}},
     StructuredOutput(GuideKind.JSON, json.dumps(SCHEMA))),
    ({"structured_outputs": {"json": SCHEMA}}, StructuredOutput(GuideKind.JSON, json.dumps(SCHEMA))),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutput(GuideKind.JSON, json.dumps(SCHEMA))),
    ({"structured_outputs": {"regex": "[a-z]+", "disable_fallback": True}}, StructuredOutput(GuideKind.REGEX,
                                                                                             "[a-z]+")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutput(GuideKind.CHOICE, choices=("yes", "no"))),
    ({"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}, StructuredOutput(GuideKind.GRAMMAR,
                                                                                 'root ::= "a" | "b"')),
    ({"structured_outputs": {"json_object": True}}, StructuredOutput(GuideKind.JSON_OBJECT)),
    ({"guided_json": SCHEMA}, StructuredOutput(GuideKind.JSON, json.dumps(SCHEMA))),
    ({"guided_regex": "[0-9]{3}"}, StructuredOutput(GuideKind.REGEX, "[0-9]{3}")),
    ({"guided_choice": ["x", "y"]}, StructuredOutput(GuideKind.CHOICE, choices=("x", "y"))),
    ({"guided_grammar": 'start: "a"+'}, StructuredOutput(GuideKind.GRAMMAR, 'start: "a"+')),
    ({"response_format": {"type": "text"}, "structured_outputs": {}}, None),
])
def test_each_spelling_reaches_the_request_as_the_same_structured_output(path, extra, expected):
    response, orchestrator = post(path, {**extra, "n": 2})
    assert response.status_code == 200, response.text
    assert [r.sampling.structured_output for r in orchestrator.received] == [expected, expected]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("extra, field, why", [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "unclosed group"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "unclosed group"),
    ({"structured_outputs": {"json": {"type": "wizard"}}}, "structured_outputs.json", "wizard"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "wizard"}}}},
     "response_format.json_schema.schema", "wizard"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}},
     "response_format.json_schema.schema", "required"),
    ({"response_format": {"type": "structural_tag"}}, "response_format.type", "not supported"),
    ({"structured_outputs": {"grammar": "start: ???"}}, "structured_outputs.grammar", "invalid"),
    ({"structured_outputs": {"choice": "yes"}}, "structured_outputs.choice", "list of strings"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "give one of"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " *"}}, "structured_outputs.whitespace_pattern",
     "not supported"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp", "unknown key"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "give one structured"),
])
def test_an_invalid_or_doubled_structured_output_is_a_400_naming_the_field(path, extra, field, why):
    response, orchestrator = post(path, extra)
    message = assert_error(response, 400, "invalid_request_error", field)
    assert message.startswith(f"{field}: ") and why in message, message
    assert orchestrator.received == []


def test_a_schema_nested_too_deeply_for_the_json_parser_is_refused_by_name():
    from pdserve.engine.structured_output import GuideKind, StructuredOutputError, _compile

    deep = '{"type": "array", "items": ' * 2000 + "{}" + "}" * 2000
    with pytest.raises(StructuredOutputError, match="nested too deeply"):
        _compile(GuideKind.JSON, deep, ())
