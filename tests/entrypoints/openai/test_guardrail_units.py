"""Rate limiter, API keys and the api-keys file, without a server."""

from __future__ import annotations

import hashlib
import json

import pytest

from tokenmill.entrypoints.openai.auth import Authenticator
from tokenmill.entrypoints.openai.errors import OpenAIError
from tokenmill.entrypoints.openai.rate_limit import RateLimiter
from tokenmill.entrypoints.openai.server_config import (
    ApiKey,
    RateLimit,
    ServerConfig,
    hash_key,
    load_api_keys_file,
    parse_feature_limit,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_bucket_and_retry_after():
    clock = Clock()
    key = ApiKey("k", hash_key("k"), RateLimit(requests_per_minute=3))
    limiter = RateLimiter(RateLimit(), {}, clock)
    for _ in range(3):
        limiter.acquire(key, None, 10)
    with pytest.raises(OpenAIError) as e:
        limiter.acquire(key, None, 10)
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "20"  # one request per 20 s
    clock.now += 20
    limiter.acquire(key, None, 10)


def test_tokens_per_minute_refund_and_too_large():
    clock = Clock()
    limiter = RateLimiter(RateLimit(tokens_per_minute=100), {}, clock)
    key = ApiKey("k", hash_key("k"))  # no own limit: the default applies
    with pytest.raises(OpenAIError) as e:
        limiter.acquire(key, None, 101)
    assert e.value.status == 400
    first = limiter.acquire(key, None, 80)
    with pytest.raises(OpenAIError) as e:
        limiter.acquire(key, None, 80)
    assert e.value.status == 429 and int(e.value.headers["Retry-After"]) == 36  # 60 tokens short at 100/min
    limiter.settle(first, 20)  # used 20 of the 80 reserved: 60 come back
    limiter.settle(first, 20)  # settling twice gives nothing more
    limiter.acquire(key, None, 80)


def test_feature_limit_applies_across_keys_and_refusal_takes_nothing():
    clock = Clock()
    limiter = RateLimiter(RateLimit(requests_per_minute=2), {"search": RateLimit(requests_per_minute=1)}, clock)
    a, b = ApiKey("a", hash_key("a")), ApiKey("b", hash_key("b"))
    limiter.acquire(a, "search", 1)
    with pytest.raises(OpenAIError) as e:
        limiter.acquire(b, "search", 1)
    assert "feature 'search'" in e.value.message
    # The refused request took nothing from b's own bucket: b still has both of its requests.
    limiter.acquire(b, None, 1)
    limiter.acquire(b, "other", 1)


def test_unlimited_by_default():
    clock = Clock()
    limiter = RateLimiter(RateLimit(), {}, clock)
    key = ApiKey("a", b"")
    for _ in range(1000):
        reservation = limiter.acquire(key, "f", 10**6)  # never refused, however many and however large
        # Nothing is metered: the reservation holds no bucket, so settling it gives nothing back.
        assert reservation.num_tokens == 10**6 and reservation.token_buckets == []
        limiter.settle(reservation, 0)
    # A key with its own limit is still limited under the unlimited default.
    limited = ApiKey("b", b"", RateLimit(requests_per_minute=1))
    limiter.acquire(limited, "f", 1)
    with pytest.raises(OpenAIError) as e:
        limiter.acquire(limited, "f", 1)
    assert e.value.status == 429


def test_authenticator():
    auth = Authenticator([ApiKey("alice", hash_key("sk-a")), ApiKey("bob", hash_key("sk-b"))])
    assert auth.authenticate("Bearer sk-b").name == "bob"
    assert auth.authenticate("bearer  sk-a ").name == "alice"
    for header in (None, "", "Bearer", "Bearer sk-c", "Basic sk-a", "sk-a"):
        with pytest.raises(OpenAIError) as e:
            auth.authenticate(header)
        assert e.value.status == 401
    assert Authenticator([]).authenticate(None).name == "anonymous"


def test_api_keys_file(tmp_path):
    path = tmp_path / "keys.json"
    digest = hashlib.sha256(b"sk-hashed").hexdigest()
    path.write_text(json.dumps({
        "keys": [{"name": "a", "key": "sk-a", "requests_per_minute": 5},
                 {"name": "h", "key_sha256": digest}],
        "features": {"search": {"tokens_per_minute": 1000}},
    }))
    keys, features = load_api_keys_file(path)
    assert [k.name for k in keys] == ["a", "h"]
    assert keys[0].rate_limit == RateLimit(5, None) and keys[1].rate_limit is None
    assert Authenticator(keys).authenticate("Bearer sk-hashed").name == "h"
    assert features == {"search": RateLimit(None, 1000)}


@pytest.mark.parametrize("content,message", [
    ("{", "not valid JSON"),
    ('{"keys": [{"name": "a"}]}', "exactly one of 'key'"),
    ('{"keys": [{"key": "x", "requests_per_minute": 0}]}', "positive integer"),
    ('{"keys": [{"key": "x", "rpm": 1}]}', "unknown fields"),
    ('{"keys": [], "extra": 1}', "unknown fields"),
    ('{"features": {"bad tag": {}}}', "feature tag"),
])
def test_api_keys_file_errors(tmp_path, content, message):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_api_keys_file(path)


def test_feature_limit_flag():
    assert parse_feature_limit("search=60:20000") == ("search", RateLimit(60, 20000))
    assert parse_feature_limit("chat=:500") == ("chat", RateLimit(None, 500))
    for bad in ("search", "search=x", "search=1:2:3", "bad tag=1"):
        with pytest.raises(ValueError):
            parse_feature_limit(bad)


def test_server_config_validation():
    ServerConfig().validate()
    with pytest.raises(ValueError, match="max_queue_len"):
        ServerConfig(max_queue_len=0).validate()
    with pytest.raises(ValueError, match="same API key"):
        ServerConfig(api_keys=(ApiKey("a", hash_key("k")), ApiKey("b", hash_key("k")))).validate()
