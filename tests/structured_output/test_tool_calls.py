"""Tool-call grammars (structural tags): "required" gives only calls whose arguments validate, "auto" lets text
through until the trigger and then constrains the call; guidance refuses structural tags with a clear error."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.structured_output.sampling import sample_masked
from tokenmill.entrypoints.openai.tool_parsers import get_tool_parser
from tokenmill.structured_output import StructuredOutputError, StructuredOutputsParams
from tokenmill.structured_output.tool_calls import tool_call_params

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "days", "metric"],
}
NOOP = {"type": "object", "properties": {}}
SCHEMAS = {"get_weather": WEATHER, "noop": NOOP}


def accepts(compiled, tokenizer, text: str) -> bool:
    matcher = compiled.matcher()
    ok = all(matcher.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
    return ok and matcher.is_completed()


@pytest.mark.parametrize("parser_name", ["hermes", "llama3_json"])
@pytest.mark.parametrize("parallel", [False, True])
def test_required_calls_always_validate(tiny_manager, tiny_tokenizer, parser_name, parallel):
    parser = get_tool_parser(parser_name)
    tags = [parser.call_tag(name, schema) for name, schema in SCHEMAS.items()]
    compiled = tiny_manager.compile(tool_call_params(tags, "required", parallel, parser.separator, parser.trigger))
    num_calls = set()
    for seed in range(12):
        token_ids, terminated = sample_masked(compiled.matcher(), tiny_tokenizer.vocab_size, seed, max_tokens=400)
        # One call always ends; parallel calls go on while the (random) model keeps opening new ones.
        assert terminated or parallel
        text = tiny_tokenizer.decode(token_ids)
        extracted = parser.extract(text, final=True)
        if terminated:  # (a cut inside a call's head leaves that head as text)
            assert extracted.content == "", text
        assert extracted.tool_calls, text
        complete = [call for call in extracted.tool_calls if call.complete]
        assert len(complete) >= len(extracted.tool_calls) - 1
        num_calls.add(len(complete))
        for call in complete:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert num_calls == {1} if not parallel else max(num_calls) > 1


def test_auto_mode_text_and_constrained_calls(tiny_manager, tiny_tokenizer):
    hermes = get_tool_parser("hermes")
    tags = [hermes.call_tag(name, schema) for name, schema in SCHEMAS.items()]
    compiled = tiny_manager.compile(tool_call_params(tags, "auto", False, hermes.separator, hermes.trigger))
    assert accepts(compiled, tiny_tokenizer, "Just text, no call.")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3, "metric": true}}\n</tool_call>'
    assert accepts(compiled, tiny_tokenizer, "Let me look. " + call)
    # Once the trigger is written, only a valid call may follow.
    assert not accepts(compiled, tiny_tokenizer, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"')
    assert not accepts(compiled, tiny_tokenizer, '<tool_call>\n{"name": "unknown"')
    assert not accepts(compiled, tiny_tokenizer, '<tool_call> hello')
    # Not parallel: the reply ends after its first call.
    assert not accepts(compiled, tiny_tokenizer, call + "\n" + call)


def test_guidance_refuses_structural_tags(tiny_manager):
    hermes = get_tool_parser("hermes")
    params = tool_call_params([hermes.call_tag("noop", NOOP)], "required", True, "\n")
    guided = StructuredOutputsParams(structural_tag=params.structural_tag, backend="guidance")
    with pytest.raises(StructuredOutputError, match="xgrammar backend only"):
        tiny_manager.compile(guided)


@pytest.mark.parametrize("value, message", [
    ("{not json", "not valid JSON"),
    ({"type": "tag"}, "must be an object"),
])
def test_bad_structural_tags(value, message):
    with pytest.raises(StructuredOutputError, match=message):
        StructuredOutputsParams(structural_tag=value)
