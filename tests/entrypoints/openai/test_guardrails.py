"""API keys, rate limits and the max_tokens cap, against the real server."""

from __future__ import annotations

import httpx
import pytest

from tests.entrypoints.openai.conftest import (
    LIMITED_KEY,
    MAX_TOKENS_LIMIT,
    MODEL_NAME,
    TIGHT_FEATURE,
    TPM_KEY,
    assert_openai_error,
)

pytestmark = pytest.mark.slow  # starts tokenmill serve processes

ROUTES = [
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{MODEL_NAME}", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1]}),
]


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[r[1] for r in ROUTES])
def test_every_guarded_route_needs_a_valid_key(server, auth_headers, method, path, body):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic abc"}):
        r = httpx.request(method, server.url + path, json=body, headers=headers)
        error = assert_openai_error(r, 401)
        assert error["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    r = httpx.request(method, server.url + path, json=body, headers=auth_headers, timeout=30)
    assert r.status_code == 200, r.text


def test_health_and_metrics_stay_open(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def _complete(server, key: str, extra_headers: dict | None = None, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **(extra_headers or {})}
    return httpx.post(server.base_url + "/completions", headers=headers, timeout=30,
                      json={"prompt": "rate", "max_tokens": 2, **body})


def test_requests_per_minute_per_key(server, auth_headers):
    assert _complete(server, LIMITED_KEY).status_code == 200
    assert _complete(server, LIMITED_KEY).status_code == 200
    r = _complete(server, LIMITED_KEY)
    error = assert_openai_error(r, 429)
    assert int(r.headers["retry-after"]) >= 1
    assert "'limited'" in error["message"] and "2 requests per minute" in error["message"]
    # Other keys are not affected.
    assert _complete(server, auth_headers["Authorization"].split()[1]).status_code == 200


def test_requests_per_minute_per_feature(server, auth_headers):
    key = auth_headers["Authorization"].split()[1]
    assert _complete(server, key, {"X-Feature": TIGHT_FEATURE}).status_code == 200
    r = _complete(server, key, metadata={"feature": TIGHT_FEATURE})
    error = assert_openai_error(r, 429)
    assert TIGHT_FEATURE in error["message"] and int(r.headers["retry-after"]) >= 1


def test_tokens_per_minute(server):
    # prompt + max_tokens over the whole per-minute budget: can never pass, so 400 rather than 429.
    error = assert_openai_error(_complete(server, TPM_KEY, max_tokens=150), 400)
    assert "100 tokens per minute" in error["message"]
    assert _complete(server, TPM_KEY, max_tokens=60, ignore_eos=True).status_code == 200
    r = _complete(server, TPM_KEY, max_tokens=60, ignore_eos=True)
    assert_openai_error(r, 429)
    assert int(r.headers["retry-after"]) >= 1


def test_max_tokens_cap(server, auth_headers):
    r = httpx.post(server.base_url + "/completions", headers=auth_headers,
                   json={"prompt": "cap", "max_tokens": MAX_TOKENS_LIMIT + 1})
    error = assert_openai_error(r, 400)
    assert error["param"] == "max_tokens" and str(MAX_TOKENS_LIMIT) in error["message"]
    r = httpx.post(server.base_url + "/chat/completions", headers=auth_headers,
                   json={"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**6})
    assert assert_openai_error(r, 400)["param"] == "max_completion_tokens"


def test_default_max_tokens_is_bounded(server, auth_headers):
    # No max_tokens: a bounded default (the context left, capped by --max-tokens-limit), never an error.
    r = httpx.post(server.base_url + "/chat/completions", headers=auth_headers, timeout=60,
                   json={"messages": [{"role": "user", "content": "x"}], "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= MAX_TOKENS_LIMIT
