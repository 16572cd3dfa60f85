"""A server with one batch slot: a full waiting queue gets 503; SIGTERM drains in-flight streams, exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.entrypoints.openai.conftest import ServerProcess, assert_openai_error

pytestmark = pytest.mark.slow  # starts and signals tokenmill serve processes

LONG = {"prompt": "tell me everything", "max_tokens": 480, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}}


@pytest.fixture
def one_slot_server(server_model_dir, tmp_path):
    proc = ServerProcess([str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "8MiB",
                          "--max-num-seqs", "1", "--max-queue-len", "1", "--shutdown-timeout", "60"],
                         tmp_path / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


class Stream(threading.Thread):
    """Reads one streamed completion in the background; .first is set when its response starts."""

    def __init__(self, server: ServerProcess, body: dict) -> None:
        super().__init__(daemon=True)
        self.server, self.body = server, body
        self.first = threading.Event()
        self.events: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.server.base_url + "/completions", json=self.body, timeout=120) as r:
                self.status = r.status_code
                self.first.set()
                self.events.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.first.set()

    def summary(self) -> tuple[str | None, int, int]:
        """(finish reason, completion tokens from the usage chunk, number of [DONE] events)."""
        chunks = [json.loads(e) for e in self.events if e != "[DONE]"]
        assert all("error" not in c for c in chunks), chunks[-1]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1]
        return finish, chunks[-1]["usage"]["completion_tokens"], sum(1 for e in self.events if e == "[DONE]")


def test_queue_full_then_sigterm_drains(one_slot_server):
    server = one_slot_server
    running = Stream(server, LONG)
    running.start()
    assert running.first.wait(30) and running.status == 200
    queued = Stream(server, {**LONG, "max_tokens": 200})
    queued.start()
    assert queued.first.wait(30) and queued.status == 200
    # One request runs (max-num-seqs 1), one waits (max-queue-len 1): the next one is refused.
    r = httpx.post(server.base_url + "/completions", json={"prompt": "x", "max_tokens": 2})
    error = assert_openai_error(r, 503)
    assert error["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1

    # SIGTERM while both stream: health turns 503, new requests get 503, the streams complete, exit 0.
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (health := httpx.get(server.url + "/health")).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    r = httpx.post(server.base_url + "/completions", json={"prompt": "x", "max_tokens": 2})
    assert assert_openai_error(r, 503)["code"] == "server_draining"
    for stream, max_tokens in ((running, 480), (queued, 200)):
        stream.join(60)
        assert stream.error is None, stream.error
        assert stream.summary() == ("length", max_tokens, 1)
    assert server.proc.wait(30) == 0
    assert "Shutting down" in server.log()
