"""Random-logit sampling through the grammar mask alone always gives outputs that match the specification and
end with a stop token allowed only where the grammar is complete: JSON schemas (validated with jsonschema),
regexes, choices and grammars, on both backends, on the tiny tokenizer and the bundled 49k-token one."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.structured_output.conftest import needs_bundled
from tests.structured_output.sampling import sample_masked
from tokenmill.structured_output import StructuredOutputsParams

BACKENDS = ("xgrammar", "guidance")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "member": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 8},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "member", "role", "address", "tags"],
}
# Optional properties, nested arrays of objects, a const and a nullable field.
INVENTORY = {
    "type": "object",
    "properties": {
        "kind": {"const": "inventory"},
        "items": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                    "count": {"type": "integer", "minimum": 0, "maximum": 999},
                    "fragile": {"type": "boolean"},
                },
                "required": ["sku", "count"],
            },
        },
        "note": {"type": ["string", "null"], "maxLength": 6},
    },
    "required": ["kind", "items"],
}
# Pydantic-style: $defs and $ref, anyOf.
ORDER = {
    "$defs": {
        "Money": {
            "type": "object",
            "properties": {"amount": {"type": "integer", "minimum": 0, "maximum": 10000},
                           "currency": {"enum": ["EUR", "USD"]}},
            "required": ["amount", "currency"],
        }
    },
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99},
        "total": {"$ref": "#/$defs/Money"},
        "status": {"anyOf": [{"enum": ["open", "closed"]}, {"type": "boolean"}]},
    },
    "required": ["id", "total", "status"],
}
SCHEMAS = {"person": PERSON, "inventory": INVENTORY, "order": ORDER}

REGEXES = [
    r"(\+1 )?[0-9]{3}-[0-9]{3}-[0-9]{4}",
    r"[a-z]{2,8}@[a-z]{2,6}\.(com|org|net)",
    r"(yes|no|maybe)( because [a-z ]{1,12})?",
]
CHOICES = ["yes", "no", "maybe so", 'say "hi"', "café 東京", "line\nbreak"]
MAX_TOKENS = 400


def check_json(tokenizer, matcher_factory, schema, seeds, compact):
    for seed in seeds:
        matcher = matcher_factory()
        token_ids, terminated = sample_masked(matcher, tokenizer.vocab_size, seed, MAX_TOKENS)
        text = tokenizer.decode(token_ids)
        assert terminated, f"seed {seed}: no stop token within {MAX_TOKENS} tokens: {text!r}"
        assert tokenizer.decode(token_ids, skip_special_tokens=False) == text, "a special token was generated"
        value = json.loads(text)  # strict: no raw control characters inside strings
        jsonschema.validate(value, schema)
        if compact:
            assert json.dumps(value, separators=(",", ":"), ensure_ascii=False) == text


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("compact", [True, False], ids=["compact", "capped_whitespace"])
def test_json_schema_outputs_validate_tiny_tokenizer(tiny_manager, tiny_tokenizer, backend, name, compact):
    params = StructuredOutputsParams(json=SCHEMAS[name], backend=backend, disable_any_whitespace=compact)
    compiled = tiny_manager.compile(params)
    assert compiled.backend.name == backend
    check_json(tiny_tokenizer, compiled.matcher, SCHEMAS[name], range(12), compact)


@needs_bundled
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate_bundled_tokenizer(bundled_manager, bundled_tokenizer, backend, name):
    params = StructuredOutputsParams(json=SCHEMAS[name], backend=backend)
    compiled = bundled_manager.compile(params)
    check_json(bundled_tokenizer, compiled.matcher, SCHEMAS[name], range(6), compact=False)


@needs_bundled
@pytest.mark.slow
def test_json_schema_outputs_validate_bundled_tokenizer_auto(bundled_manager, bundled_tokenizer):
    """The auto backend, compact JSON."""
    compiled = bundled_manager.compile(StructuredOutputsParams(json=PERSON, disable_any_whitespace=True))
    check_json(bundled_tokenizer, compiled.matcher, PERSON, range(4), compact=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regex_outputs_match(tiny_manager, tiny_tokenizer, backend):
    for regex in REGEXES:
        compiled = tiny_manager.compile(StructuredOutputsParams(regex=regex, backend=backend))
        for seed in range(10):
            token_ids, terminated = sample_masked(compiled.matcher(), tiny_tokenizer.vocab_size, seed, MAX_TOKENS)
            text = tiny_tokenizer.decode(token_ids)
            assert terminated and re.fullmatch(regex, text), (regex, seed, text)


@pytest.mark.parametrize("backend", BACKENDS)
def test_choice_outputs_are_choices(tiny_manager, tiny_tokenizer, backend):
    compiled = tiny_manager.compile(StructuredOutputsParams(choice=CHOICES, backend=backend))
    seen = set()
    for seed in range(30):
        token_ids, terminated = sample_masked(compiled.matcher(), tiny_tokenizer.vocab_size, seed, MAX_TOKENS)
        text = tiny_tokenizer.decode(token_ids)
        assert terminated and text in CHOICES, (seed, text)
        seen.add(text)
    assert len(seen) >= 3, f"the mask should leave every choice reachable, saw only {seen}"


@needs_bundled
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_regex_and_choice_bundled_tokenizer(bundled_manager, bundled_tokenizer, backend):
    regex = REGEXES[1]
    compiled = bundled_manager.compile(StructuredOutputsParams(regex=regex, backend=backend))
    choices = bundled_manager.compile(StructuredOutputsParams(choice=CHOICES, backend=backend))
    for seed in range(4):
        token_ids, terminated = sample_masked(compiled.matcher(), bundled_tokenizer.vocab_size, seed, MAX_TOKENS)
        assert terminated and re.fullmatch(regex, bundled_tokenizer.decode(token_ids))
        token_ids, terminated = sample_masked(choices.matcher(), bundled_tokenizer.vocab_size, seed, MAX_TOKENS)
        assert terminated and bundled_tokenizer.decode(token_ids) in CHOICES


@pytest.mark.parametrize(
    ("backend", "grammar"),
    [
        ("xgrammar", 'root ::= "The answer is " ("yes" | "no") " (" [0-9] [0-9]? "%)."'),
        ("xgrammar", 'start: "The answer is " ("yes" | "no") " (" DIGIT DIGIT? "%)."\nDIGIT: /[0-9]/'),
        ("guidance", 'start: "The answer is " ("yes" | "no") " (" DIGIT DIGIT? "%)."\nDIGIT: /[0-9]/'),
        ("guidance", 'root ::= "The answer is " ("yes" | "no") " (" [0-9] [0-9]? "%)."'),
    ],
    ids=["xgrammar-ebnf", "xgrammar-lark", "guidance-lark", "guidance-gbnf"],
)
def test_grammar_outputs_match(tiny_manager, tiny_tokenizer, backend, grammar):
    compiled = tiny_manager.compile(StructuredOutputsParams(grammar=grammar, backend=backend))
    for seed in range(10):
        token_ids, terminated = sample_masked(compiled.matcher(), tiny_tokenizer.vocab_size, seed, MAX_TOKENS)
        text = tiny_tokenizer.decode(token_ids)
        assert terminated and re.fullmatch(r"The answer is (yes|no) \([0-9]{1,2}%\)\.", text), text


@pytest.mark.parametrize("backend", BACKENDS)
def test_json_object_accepts_objects_only(tiny_manager, tiny_tokenizer, backend):
    compiled = tiny_manager.compile(
        StructuredOutputsParams(json_object=True, backend=backend, disable_any_whitespace=True)
    )
    text = '{"a":[1,2.5,{"b":null}],"c":"d","e":true}'
    matcher = compiled.matcher()
    token_ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    for index, token_id in enumerate(token_ids):
        assert not matcher.is_completed(), f"complete before the object closed, at token {index}"
        assert matcher.accept_token(token_id)
    assert matcher.is_completed()
    eos = tiny_tokenizer.eos_token_id
    assert matcher.accept_token(eos) and matcher.is_terminated()
    for not_an_object in ("[1]", '"s"', "7"):
        first = tiny_tokenizer.encode(not_an_object, add_special_tokens=False)[0]
        assert not compiled.matcher().accept_token(first), not_an_object
