"""Structured outputs through the real server (tiny random-weight model, whose free output is noise): the
openai SDK's chat.completions.parse with a pydantic model, response_format json_object, vLLM's
structured_outputs extra and its older guided_* names, and the 400s for bad specifications."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME, assert_openai_error

pytestmark = pytest.mark.slow  # drives a tokenmill serve process

USER = [{"role": "user", "content": "Describe a user."}]


class Address(BaseModel):
    city: Literal["Paris", "Oslo", "Lima"]
    zip_code: int = Field(ge=0, le=99999)


class User(BaseModel):
    name: str = Field(max_length=10)
    admin: bool
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)
    address: Address


SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 50}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"],
}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server, auth_headers):
    with httpx.Client(base_url=server.url, headers=auth_headers, timeout=120) as c:
        yield c


def test_sdk_parse_returns_the_pydantic_object(client):
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=MODEL_NAME, messages=USER, response_format=User, temperature=1.0, seed=seed, max_tokens=200,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, User)
        assert User.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_and_schema_on_completions(client, http):
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, response_format={"type": "json_object"}, temperature=0.7, seed=4,
        max_tokens=200,
    )
    choice = chat.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # an object is unbounded: the cut is reported, never passed off as complete
        assert choice.finish_reason == "length"
    r = http.post("/v1/completions", json={
        "prompt": "x", "max_tokens": 100, "temperature": 1.0, "seed": 3, "n": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n_ok", "schema": SCHEMA}},
    })
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert c["finish_reason"] == "stop"
        jsonschema.validate(json.loads(c["text"]), SCHEMA)


@pytest.mark.parametrize("body, check", [
    ({"structured_outputs": {"regex": r"[xyz]{3}-\d\d"}}, lambda t: re.fullmatch(r"[xyz]{3}-\d\d", t)),
    ({"structured_outputs": {"choice": ["alpha", "beta"]}}, lambda t: t in ("alpha", "beta")),
    ({"structured_outputs": {"json": SCHEMA}}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"guided_json": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"guided_regex": r"(ab)+c"}, lambda t: re.fullmatch(r"(ab)+c", t)),
    ({"guided_choice": ["one", "two", "three"]}, lambda t: t in ("one", "two", "three")),
    ({"guided_grammar": 'root ::= "go" ("!" | "?")'}, lambda t: t in ("go!", "go?")),
], ids=["regex", "choice", "json", "guided_json", "guided_regex", "guided_choice", "guided_grammar"])
def test_structured_outputs_extra_and_guided_aliases(http, body, check):
    r = http.post("/v1/chat/completions", json={
        "messages": USER, "max_tokens": 100, "temperature": 1.0, "seed": 11, **body,
    })
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert check(choice["message"]["content"]), choice["message"]["content"]


@pytest.mark.parametrize("body, param, text", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "not a valid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name", "name"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "not a valid regex"),
    ({"guided_choice": []}, "guided_choice", "empty list"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "empty list"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"jsn": SCHEMA}}, "structured_outputs", "unknown field"),
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex", "only one"),
], ids=["bad-schema", "schema-no-name", "bad-regex", "empty-guided-choice", "empty-choice", "two-kinds",
        "unknown-field", "two-sources"])
def test_bad_specifications_are_400s(http, body, param, text):
    r = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 8, **body})
    error = assert_openai_error(r, 400)
    assert error["param"] == param, error
    assert text in error["message"], error


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x"}),
    ("/v1/completions", {"prompt": ["x", "y"], "stream": True}),
    ("/v1/chat/completions", {"messages": USER, "stream": True}),
], ids=["completions", "completions-stream", "chat-stream"])
def test_grammar_that_does_not_compile_is_a_400_and_the_server_serves_on(http, path, body):
    # Found only by the backend's compile (in the engine), streamed or not: a 400 before any event.
    r = http.post(path, json={"max_tokens": 8, "structured_outputs": {"grammar": "root ::= undefined_rule"},
                              **body})
    error = assert_openai_error(r, 400)
    assert "grammar" in error["message"]
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_streamed_output_equals_the_non_streamed_one(client):
    kwargs = dict(model=MODEL_NAME, messages=USER, temperature=1.0, seed=21, max_tokens=100,
                  response_format={"type": "json_schema", "json_schema": {"name": "n_ok", "schema": SCHEMA}})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
