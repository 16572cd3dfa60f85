"""One client must not hog the server: body-size limit, per-request caps, header-read timeout, a waiting queue
that holds under bursts; and CORS flags."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from tests.entrypoints.openai.conftest import ServerProcess, assert_openai_error

TEN_MB = 10 * 1024 * 1024
MAX_QUEUE_LEN = 4
ORIGIN = "http://app.example"


class HealthProbe(threading.Thread):
    """GET /health over and over on one connection, recording each latency, until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.latencies: list[float] = []
        self.statuses: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                start = time.perf_counter()
                self.statuses.add(client.get(self.url + "/health").status_code)
                self.latencies.append(time.perf_counter() - start)
                time.sleep(0.005)

    def __enter__(self) -> HealthProbe:
        self.start()
        time.sleep(0.2)  # a few calls before the load starts
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)
        self.stop.set()
        self.join(30)


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


@pytest.fixture(scope="module")
def limits_server(server_model_dir, tmp_path_factory):
    proc = ServerProcess([
        str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "8MiB", "--max-num-seqs", "1",
        "--max-queue-len", str(MAX_QUEUE_LEN), "--header-read-timeout", "1", "--max-prompts-per-request", "4",
        "--max-choices-per-request", "6", "--max-request-body-bytes", "2000", "--allowed-origins", ORIGIN,
        "--allowed-methods", '["GET", "POST"]', "--allowed-headers", "authorization", "--allowed-headers",
        "content-type", "--allow-credentials",
    ], tmp_path_factory.mktemp("limits") / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.mark.slow  # starts its own server (module-scoped)
def test_body_limit_flag(limits_server):
    r = httpx.post(limits_server.base_url + "/completions", json={"prompt": "x" * 3000, "max_tokens": 1})
    error = assert_openai_error(r, 413)
    assert "2000 bytes" in error["message"]
    r = httpx.post(limits_server.base_url + "/completions", json={"prompt": "x" * 100, "max_tokens": 1})
    assert r.status_code == 200, r.text


@pytest.mark.slow  # starts its own server (module-scoped)
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


@pytest.mark.slow  # starts its own server (module-scoped)
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


@pytest.mark.slow  # starts its own server (module-scoped)
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


@pytest.mark.slow  # starts its own server (module-scoped)
def test_queue_limit_holds_under_a_burst(limits_server):
    """20 simultaneous streams, one batch slot and --max-queue-len 4: at most 1 running + 4 waiting admitted."""
    url = limits_server.base_url + "/completions"
    body = {"prompt": "burst", "max_tokens": 400, "ignore_eos": True, "stream": True}
    waiting_seen: list[float] = []
    stop = threading.Event()

    def watch_waiting() -> None:
        while not stop.is_set():
            waiting_seen.append(limits_server.metrics()["vllm:num_requests_waiting"])
            time.sleep(0.02)

    async def burst() -> list[tuple[int, dict | None]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=40)) as client:
            start = asyncio.Event()

            async def one() -> tuple[int, dict | None]:
                await start.wait()
                async with client.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        return r.status_code, {**r.json(), "retry-after": r.headers.get("retry-after")}
                    # Admitted: read the first event, then hang up (aborts the request).
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break
                    return 200, None

            tasks = [asyncio.create_task(one()) for _ in range(20)]
            await asyncio.sleep(0.1)
            start.set()
            done = []
            for task in tasks:
                done.append(await task)
            return done

    watcher = threading.Thread(target=watch_waiting, daemon=True)
    watcher.start()
    try:
        results = asyncio.run(burst())
    finally:
        stop.set()
        watcher.join(10)
    admitted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert 1 <= len(admitted) <= MAX_QUEUE_LEN + 1, [r[0] for r in results]
    assert len(refused) >= 20 - MAX_QUEUE_LEN - 1
    for status, error in refused:
        assert status == 503 and error["error"]["code"] == "queue_full", error
        assert int(error["retry-after"]) >= 1
    assert max(waiting_seen, default=0) <= MAX_QUEUE_LEN, max(waiting_seen)
    limits_server.wait_idle(30)
