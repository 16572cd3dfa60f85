"""What the shared server refuses, and how it says so: unknown parameters, lone surrogates, context errors,
/tokenize errors, and the OpenAPI schema that describes it; model ids with "/"; the /v1 tokenize aliases."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.entrypoints.openai.conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME, assert_openai_error


def _post_raw(server, auth_headers, path: str, body: str) -> httpx.Response:
    """POST a JSON text as written: JSON's "\\ud800" escapes reach the server as they are."""
    headers = {**auth_headers, "Content-Type": "application/json"}
    return httpx.post(server.url + path, content=body.encode("ascii"), headers=headers, timeout=30)


def test_models_retrieve_with_a_slash_in_the_id(server):
    assert "/" in MODEL_NAME
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=30)
    model = client.models.retrieve(MODEL_NAME)
    assert model.id == MODEL_NAME and model.object == "model"


def test_unknown_model_id_with_slashes_is_404(server, auth_headers):
    r = httpx.get(server.base_url + "/models/org/other/model", headers=auth_headers)
    error = assert_openai_error(r, 404)
    assert error["code"] == "model_not_found" and "'org/other/model'" in error["message"]


def test_models_root_is_the_model_as_given(server, auth_headers, server_model_dir):
    [card] = httpx.get(server.base_url + "/models", headers=auth_headers).json()["data"]
    assert card["root"] == str(server_model_dir)


@pytest.mark.parametrize("name", ["guided_whitespace_pattern", "strict", "listing", "intercept", "boolean_flag", "dictum"])
def test_unknown_parameter_named(server, auth_headers, name):
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = httpx.post(server.url + path, headers=auth_headers, json={**body, name: 1})
        error = assert_openai_error(r, 400)
        assert error["param"] == name, error
        assert f"Unrecognized request argument supplied: {name}" in error["message"], error


LONE = '"ab\\ud800cd"'  # JSON text: a string with a lone high surrogate


def _body(template: str, text: str = LONE) -> str:
    """A JSON body: USER is a user message holding TEXT; TEXT is the JSON string given."""
    return template.replace("USER", '{"role": "user", "content": TEXT}').replace("TEXT", text)


SURROGATE_CASES = [
    ("completion-prompt", "/v1/completions", _body('{"prompt": TEXT, "max_tokens": 1}'), "prompt"),
    ("completion-prompt-list", "/v1/completions", _body('{"prompt": ["ok", TEXT], "max_tokens": 1}'), "prompt.[1]"),
    ("chat-content", "/v1/chat/completions", _body('{"messages": [USER], "max_tokens": 1}'), "messages.[0].content"),
    ("chat-content-part", "/v1/chat/completions",
     _body('{"messages": [{"role": "user", "content": [{"type": "text", "text": TEXT}]}], "max_tokens": 1}'),
     "messages.[0].content.[0]"),
    ("chat-low-surrogate", "/v1/chat/completions", _body('{"messages": [USER]}', '"\\udc00"'),
     "messages.[0].content"),
    ("tokenize-prompt", "/tokenize", _body('{"prompt": TEXT}'), "prompt"),
    ("tokenize-messages", "/tokenize", _body('{"messages": [USER]}'), "messages.[0].content"),
]


@pytest.mark.parametrize("case", SURROGATE_CASES, ids=[c[0] for c in SURROGATE_CASES])
def test_lone_surrogate_is_400_naming_the_field(server, auth_headers, case):
    _, path, body, param = case
    error = assert_openai_error(_post_raw(server, auth_headers, path, body), 400)
    assert error["param"] == param, error
    assert "surrogate" in error["message"], error


def test_lone_surrogate_in_a_parameter_name_or_model_is_400(server, auth_headers):
    error = assert_openai_error(_post_raw(server, auth_headers, "/v1/completions", '{"prompt": "x", "\\ud800": 1}'),
                                400)
    assert error["message"].startswith("A parameter name holds a lone UTF-16 surrogate"), error
    r = _post_raw(server, auth_headers, "/v1/completions", '{"prompt": "x", "model": "\\ud800"}')
    assert assert_openai_error(r, 404)["code"] == "model_not_found"


def test_surrogate_pair_is_text(server, auth_headers):
    # A proper pair (an emoji) is ordinary text.
    r = _post_raw(server, auth_headers, "/tokenize", '{"prompt": "hi \\ud83d\\ude00"}')
    assert r.status_code == 200, r.text


def test_prompt_too_long_has_the_context_code(server, auth_headers):
    r = httpx.post(server.base_url + "/completions", headers=auth_headers,
                   json={"prompt": list(range(10, 10 + MAX_MODEL_LEN + 1))})
    error = assert_openai_error(r, 400)
    assert f"{MAX_MODEL_LEN + 1} tokens" in error["message"] and error["code"] == "context_length_exceeded"


def test_prompt_far_too_long_is_refused_before_tokenizing(server, auth_headers):
    # Within the body limit, but more characters than max_model_len tokens can hold.
    text = "word " * 150_000
    for path, body in (("/v1/completions", {"prompt": text}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}),
                       ("/tokenize", {"prompt": text})):
        error = assert_openai_error(httpx.post(server.url + path, headers=auth_headers, json=body, timeout=30), 400)
        assert error["code"] == "context_length_exceeded", error
        assert "characters" in error["message"] and str(MAX_MODEL_LEN) in error["message"], error


TOKENIZE_BAD = [
    {"prompt": 5},
    {"prompt": "x", "foo": 1},
    {},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": []},
    {"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
]


@pytest.mark.parametrize("body", TOKENIZE_BAD)
def test_tokenize_errors_name_no_internal_class(server, auth_headers, body):
    error = assert_openai_error(httpx.post(server.url + "/tokenize", headers=auth_headers, json=body), 400)
    text = f"{error['message']} {error['param']}"
    for internal in ("Tokenize", "Request", "tokenize-"):
        assert internal not in text, error


def test_tokenize_aliases_under_v1(server, auth_headers):
    for prefix in ("", "/v1"):
        r = httpx.post(server.url + prefix + "/tokenize", headers=auth_headers, json={"prompt": "hello there"})
        assert r.status_code == 200, r.text
        tokens = r.json()["tokens"]
        r = httpx.post(server.url + prefix + "/detokenize", headers=auth_headers, json={"tokens": tokens})
        assert r.status_code == 200 and "hello there" in r.json()["prompt"], r.text
    assert_openai_error(httpx.post(server.base_url + "/tokenize", json={"prompt": "x"}), 401)


@pytest.fixture(scope="module")
def openapi(server) -> dict:
    return httpx.get(server.url + "/openapi.json").json()


def test_openapi_declares_sse_streams(openapi):
    for path, event in (("/v1/completions", "CompletionStreamResponse"),
                        ("/v1/chat/completions", "ChatCompletionStreamResponse")):
        content = openapi["paths"][path]["post"]["responses"]["200"]["content"]
        sse = content["text/event-stream"]
        # The body is text, not one payload object; each event's data is one JSON event object.
        assert sse["schema"]["type"] == "string" and "$ref" not in sse["schema"]
        data = sse["x-sse-event"]["properties"]["data"]
        assert data["contentSchema"]["$ref"].endswith(f"/{event}")
        assert event in openapi["components"]["schemas"]
        assert "$ref" in content["application/json"]["schema"]


def test_openapi_schema_is_valid(openapi):
    from openapi_spec_validator import validate

    validate(openapi)


def test_openapi_disallows_what_the_server_rejects(openapi):
    schemas = openapi["components"]["schemas"]
    assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["minimum"] == 0
    prompt_forms = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    string_form = next(f for f in prompt_forms if f.get("type") == "string")
    assert string_form["minLength"] == 1
    string_list = next(f for f in prompt_forms if f.get("type") == "array" and f["items"].get("type") == "string")
    assert string_list["items"]["minLength"] == 1
    for form in prompt_forms:
        items = form.get("items", {})
        if items.get("type") == "integer":
            assert items["minimum"] == 0


def test_openapi_paths_include_aliases(openapi):
    for path in ("/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize", "/v1/models/{model}"):
        assert path in openapi["paths"], sorted(openapi["paths"])


def test_docs_page_works_offline(server):
    r = httpx.get(server.url + "/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()
    assert "cdn" not in r.text.lower() and "https://" not in r.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/docs-assets/{asset}" in r.text
        asset_response = httpx.get(f"{server.url}/docs-assets/{asset}")
        assert asset_response.status_code == 200 and len(asset_response.content) > 10_000
