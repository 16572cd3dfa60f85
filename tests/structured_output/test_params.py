"""StructuredOutputsParams: validation with messages that name the parameter and the problem, and the
normalised specification the compile cache is keyed by."""

from __future__ import annotations

import pytest

from tokenmill.structured_output import StructuredOutputError, StructuredOutputsParams


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "sets no constraint"),
        ({"json": {"type": "object"}, "regex": "a+"}, "sets json, regex: give exactly one"),
        ({"json": "{not json"}, "structured_outputs.json is not valid JSON"),
        ({"json": "[1, 2]"}, "structured_outputs.json must be a JSON schema object"),
        ({"json": True}, "use json_object=True"),
        ({"json": {"type": "foo"}}, "structured_outputs.json is not a valid JSON schema: at type"),
        ({"json": {"type": "object", "required": "name"}}, "at required: 'name' is not of type 'array'"),
        ({"json": {"type": "object", "properties": {"a": {"type": "integer", "minimum": "1"}}}},
         "at properties/a/minimum"),
        ({"regex": "(["}, "structured_outputs.regex '([' is not a valid regex"),
        ({"regex": ""}, "structured_outputs.regex must be a non-empty string"),
        ({"choice": []}, "structured_outputs.choice is an empty list"),
        ({"choice": ["a", 3]}, "structured_outputs.choice[1] must be a non-empty string"),
        ({"choice": "yes"}, "structured_outputs.choice must be a list of strings"),
        ({"grammar": "  "}, "structured_outputs.grammar must be a non-empty grammar string"),
        ({"json_object": "yes"}, "structured_outputs.json_object must be true"),
        ({"regex": "a", "backend": "outlines"}, "structured_outputs.backend must be one of auto, xgrammar, guidance"),
        ({"json_object": True, "max_whitespace": 0}, "structured_outputs.max_whitespace must be an integer in [1, 64]"),
        ({"json_object": True, "disable_any_whitespace": "no"}, "disable_any_whitespace must be a bool"),
    ],
)
def test_invalid_params_raise_clear_errors(kwargs, message):
    with pytest.raises(StructuredOutputError) as error:
        StructuredOutputsParams(**kwargs)
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)


def test_kinds_and_schema_text():
    params = StructuredOutputsParams(json='{"type": "object", "properties": {"b": {}, "a": {}}}')
    assert params.kind == "json"
    assert params.schema == {"type": "object", "properties": {"b": {}, "a": {}}}
    assert StructuredOutputsParams(regex="a+").kind == "regex"
    assert StructuredOutputsParams(choice=["x"]).kind == "choice"
    assert StructuredOutputsParams(grammar='root ::= "x"').kind == "grammar"
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    # json_object=False is the same as not giving it.
    assert StructuredOutputsParams(regex="a", json_object=False).kind == "regex"


def test_spec_key_normalises_equivalent_specs():
    as_dict = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    as_text = StructuredOutputsParams(json='{ "type" : "object",\n "properties": {"a": {"type": "integer"}} }')
    assert as_dict.spec_key() == as_text.spec_key()
    # Property order is generation order: a different key.
    reordered = StructuredOutputsParams(json={"properties": {"a": {"type": "integer"}}, "type": "object"})
    assert reordered.spec_key() != as_dict.spec_key()
    compact = StructuredOutputsParams(json=as_dict.schema, disable_any_whitespace=True)
    assert compact.spec_key() != as_dict.spec_key()
    # Whitespace settings do not change a regex.
    assert (StructuredOutputsParams(regex="a+", disable_any_whitespace=True).spec_key()
            == StructuredOutputsParams(regex="a+").spec_key())
    assert StructuredOutputsParams(choice=["a", "b"]).spec_key() != StructuredOutputsParams(choice=["b", "a"]).spec_key()


def test_closed_schema_closes_listed_properties_only():
    schema = {
        "type": "object",
        "properties": {
            "inner": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "free": {"type": "object"},
            "open": {"type": "object", "properties": {"y": {}}, "additionalProperties": {"type": "string"}},
            "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
        },
    }
    params = StructuredOutputsParams(json=schema)
    closed = params.closed_schema
    assert closed["additionalProperties"] is False
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["free"]
    assert closed["properties"]["open"]["additionalProperties"] == {"type": "string"}
    assert closed["properties"]["pair"]["items"] is False
    assert "additionalProperties" not in schema, "the user's schema must not be modified"
