"""Malformed and out-of-range requests: each is a 4xx in OpenAI's error shape, never a 500."""

from __future__ import annotations

import httpx
import pytest

from tests.entrypoints.openai.conftest import MAX_MODEL_LEN, assert_openai_error

pytestmark = pytest.mark.slow  # drives a tokenmill serve process

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

# (id, method, path, body (dict -> JSON, str -> raw bytes), status, expected param or None, text in the message)
CASES = [
    ("malformed-json", "POST", CMPL, '{"prompt": "x",', 400, None, "not valid JSON"),
    ("body-not-object", "POST", CMPL, "[1, 2]", 400, None, ""),
    ("empty-body", "POST", CMPL, "", 400, None, ""),
    ("missing-prompt", "POST", CMPL, {"max_tokens": 3}, 400, "prompt", "Field required"),
    ("temperature-string", "POST", CMPL, {"prompt": "x", "temperature": "0.5"}, 400, "temperature", ""),
    ("temperature-range", "POST", CMPL, {"prompt": "x", "temperature": 3}, 400, "temperature", "2"),
    ("top-p-zero", "POST", CMPL, {"prompt": "x", "top_p": 0}, 400, "top_p", ""),
    ("n-zero", "POST", CMPL, {"prompt": "x", "n": 0}, 400, "n", ""),
    ("n-bool", "POST", CMPL, {"prompt": "x", "n": True}, 400, "n", ""),
    ("max-tokens-negative", "POST", CMPL, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", ""),
    ("seed-float", "POST", CMPL, {"prompt": "x", "seed": 1.5}, 400, "seed", ""),
    ("seed-too-large", "POST", CMPL, {"prompt": "x", "seed": 2**64}, 400, "seed", ""),
    ("presence-penalty-range", "POST", CMPL, {"prompt": "x", "presence_penalty": 5}, 400, "presence_penalty", ""),
    ("logprobs-range", "POST", CMPL, {"prompt": "x", "logprobs": 21}, 400, "logprobs", ""),
    ("unknown-param", "POST", CMPL, {"prompt": "x", "foo": 1}, 400, "foo", "Unrecognized request argument"),
    ("logit-bias", "POST", CMPL, {"prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias", "not supported"),
    ("echo", "POST", CMPL, {"prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ("empty-prompt", "POST", CMPL, {"prompt": ""}, 400, "prompt", "empty"),
    ("empty-prompt-list", "POST", CMPL, {"prompt": []}, 400, "prompt", ""),
    ("token-out-of-vocab", "POST", CMPL, {"prompt": [1, 10**9]}, 400, "prompt", "vocabulary"),
    ("context-too-long", "POST", CMPL, {"prompt": "hello " * 60, "max_tokens": MAX_MODEL_LEN - 20}, 400, "max_tokens",
     f"maximum context length is {MAX_MODEL_LEN} tokens"),
    ("prompt-too-long", "POST", CMPL, {"prompt": list(range(10, 10 + MAX_MODEL_LEN + 1))}, 400, "prompt",
     f"{MAX_MODEL_LEN + 1} tokens"),
    ("min-tokens-over-max", "POST", CMPL, {"prompt": "x", "max_tokens": 2, "min_tokens": 5}, 400, "min_tokens", ""),
    ("empty-stop", "POST", CMPL, {"prompt": "x", "stop": [""]}, 400, "stop", ""),
    ("stream-options-without-stream", "POST", CMPL, {"prompt": "x", "stream_options": {"include_usage": True}},
     400, None, "stream"),
    ("bad-feature-tag", "POST", CMPL, {"prompt": "x", "metadata": {"feature": "bad tag!"}}, 400, "metadata.feature",
     "feature tag"),
    ("unknown-model", "POST", CMPL, {"prompt": "x", "model": "gpt-5"}, 404, "model", "does not exist"),
    ("chat-empty-messages", "POST", CHAT, {"messages": []}, 400, "messages", ""),
    ("chat-bad-role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.[0].role", ""),
    ("chat-content-type", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages.[0].content", "a string or a list of text parts"),
    ("prompt-type", "POST", CMPL, {"prompt": 5}, 400, "prompt", "a list of token ids"),
    ("chat-image-part", "POST", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None,
     "not supported"),
    ("chat-top-logprobs-alone", "POST", CHAT, {"messages": USER, "top_logprobs": 2}, 400, None, "logprobs"),
    ("chat-tool-without-function", "POST", CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400,
     "tools.[0].function", "Field required"),
    ("chat-response-format-type", "POST", CHAT, {"messages": USER, "response_format": {"type": "xml"}}, 400,
     "response_format.type", "'text', 'json_object' or 'json_schema'"),
    ("chat-max-tokens-zero", "POST", CHAT, {"messages": USER, "max_completion_tokens": 0}, 400,
     "max_completion_tokens", ""),
    ("unknown-route", "POST", "/v1/audio/speech", {"input": "x"}, 404, None, "does not exist"),
    ("wrong-method", "GET", CMPL, None, 405, None, "not allowed"),
    ("detokenize-negative-id", "POST", "/detokenize", {"tokens": [5, -1]}, 400, "tokens.[1]", "greater than or equal to 0"),
    ("detokenize-out-of-vocab", "POST", "/detokenize", {"tokens": [10**9]}, 400, "tokens", "vocabulary"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, auth_headers, case):
    _, method, path, body, status, param, text = case
    kwargs: dict = {"headers": dict(auth_headers), "timeout": 30}
    if isinstance(body, str):
        kwargs["content"] = body.encode()
        kwargs["headers"]["Content-Type"] = "application/json"
    elif body is not None:
        kwargs["json"] = body
    r = httpx.request(method, server.url + path, **kwargs)
    error = assert_openai_error(r, status)
    if param is not None:
        assert error["param"] == param, error
    assert text in error["message"], error


def test_at_least_15_cases():
    assert len(CASES) >= 15


def test_server_still_serves_after_bad_requests(server, auth_headers):
    r = httpx.post(server.base_url + "/completions", headers=auth_headers, json={"prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200, r.text
