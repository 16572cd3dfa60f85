"""One client must not hog the server: body-size limit, per-request caps, header-read timeout, a waiting queue
that holds under bursts; and CORS flags."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.entrypoints.openai.conftest import LIMITS_MAX_QUEUE_LEN as MAX_QUEUE_LEN
from tests.entrypoints.openai.conftest import LIMITS_ORIGIN as ORIGIN
from tests.entrypoints.openai.conftest import HealthProbe, assert_openai_error, queue_burst

TEN_MB = 10 * 1024 * 1024


def _big_completion_body(num_bytes: int) -> bytes:
    return json.dumps({"prompt": "x" * num_bytes, "max_tokens": 1}).encode()


def test_large_body_is_413_and_health_stays_fast(server, auth_headers):
    # Bodies built before the probe starts: json.dumps of 10 MB holds this process's GIL for a while.
    body = _big_completion_body(TEN_MB)
    tokenize_body = json.dumps({"prompt": "x" * TEN_MB}).encode()
    headers = {**auth_headers, "Content-Type": "application/json"}

    def chunks():
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]

    with HealthProbe(server.url) as probe:
        # With Content-Length: refused from the header. Chunked (no length): refused once the limit is passed.
        for content in (body, chunks()):
            r = httpx.post(server.base_url + "/completions", content=content, headers=headers, timeout=60)
            error = assert_openai_error(r, 413)
            assert error["code"] == "request_too_large" and "--max-request-body-bytes" in error["message"]
        r = httpx.post(server.url + "/tokenize", content=tokenize_body, headers=headers, timeout=60)
        assert_openai_error(r, 413)
    assert probe.statuses == {200}
    assert len(probe.latencies) >= 10
    assert max(probe.latencies) < 0.1, sorted(probe.latencies)[-5:]
    # The connection that sent the body is usable afterwards, and so is the server.
    r = httpx.post(server.base_url + "/completions", headers=auth_headers, json={"prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_long_prompt_under_the_body_limit_does_not_stall_health(server, auth_headers):
    # ~0.9 MB of text: under the 1 MiB body limit, refused by the length bound before tokenization.
    body = _big_completion_body(900_000)
    with HealthProbe(server.url) as probe:
        for _ in range(3):
            r = httpx.post(server.base_url + "/completions", content=body,
                           headers={**auth_headers, "Content-Type": "application/json"}, timeout=60)
            assert assert_openai_error(r, 400)["code"] == "context_length_exceeded"
    assert max(probe.latencies) < 0.1, sorted(probe.latencies)[-5:]


@pytest.mark.slow  # starts its own server (limits_server)
def test_body_limit_flag(limits_server):
    r = httpx.post(limits_server.base_url + "/completions", json={"prompt": "x" * 3000, "max_tokens": 1})
    error = assert_openai_error(r, 413)
    assert "2000 bytes" in error["message"]
    r = httpx.post(limits_server.base_url + "/completions", json={"prompt": "x" * 100, "max_tokens": 1})
    assert r.status_code == 200, r.text


@pytest.mark.slow  # starts its own server (limits_server)
def test_prompt_caps(limits_server):
    url = limits_server.base_url + "/completions"
    error = assert_openai_error(httpx.post(url, json={"prompt": ["a"] * 5, "max_tokens": 1}), 400)
    assert error["param"] == "prompt" and "--max-prompts-per-request" in error["message"]
    error = assert_openai_error(httpx.post(url, json={"prompt": ["a"] * 4, "n": 2, "max_tokens": 1}), 400)
    assert error["param"] == "n" and "8 choices" in error["message"]
    error = assert_openai_error(httpx.post(limits_server.base_url + "/chat/completions", json={
        "messages": [{"role": "user", "content": "a"}], "n": 7, "max_tokens": 1}), 400)
    assert error["param"] == "n"
    r = httpx.post(url, json={"prompt": ["a"] * 3, "n": 2, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 6, r.text


@pytest.mark.slow  # starts its own server (limits_server)
def test_slow_header_client_is_disconnected(limits_server):
    with socket.create_connection(("127.0.0.1", limits_server.port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        closed = False
        # One header byte every 0.2 s: never a complete request.
        while time.monotonic() - start < 5:
            try:
                sock.sendall(b"X")
                sock.settimeout(0.2)
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        elapsed = time.monotonic() - start
    assert closed, "the server kept a slow-header connection open"
    assert 0.8 < elapsed < 3, elapsed
    # A normal client on a keep-alive connection is unaffected.
    with httpx.Client() as client:
        for _ in range(3):
            assert client.get(limits_server.url + "/health").status_code == 200
            time.sleep(0.5)


@pytest.mark.slow  # starts its own server (limits_server)
def test_cors_flags(limits_server):
    preflight = httpx.options(limits_server.base_url + "/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert set(preflight.headers["access-control-allow-methods"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert "DELETE" not in preflight.headers["access-control-allow-methods"]
    denied = httpx.options(limits_server.base_url + "/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "DELETE"})
    assert denied.status_code == 400
    other = httpx.options(limits_server.base_url + "/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers
    r = httpx.get(limits_server.base_url + "/models", headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.slow  # starts its own server (limits_server)
def test_queue_limit_holds_under_a_burst(limits_server):
    """20 simultaneous streams, one batch slot and --max-queue-len 4: at most 1 running + 4 waiting admitted."""
    url = limits_server.base_url + "/completions"
    body = {"prompt": "burst", "max_tokens": 400, "ignore_eos": True, "stream": True}
    admitted, max_waiting = queue_burst(limits_server, url, body, 20)
    assert 1 <= admitted <= MAX_QUEUE_LEN + 1, admitted
    assert max_waiting <= MAX_QUEUE_LEN, max_waiting
    limits_server.wait_idle(30)
