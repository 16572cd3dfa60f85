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
    """Reads one streamed completion in the background; .first is set when its response starts, .first_data at its
    first event (the request has left the waiting queue: a slot is given back at the request's first output)."""

    def __init__(self, server: ServerProcess, body: dict) -> None:
        super().__init__(daemon=True)
        self.server, self.body = server, body
        self.first = threading.Event()
        self.first_data = threading.Event()
        self.events: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.server.base_url + "/completions", json=self.body, timeout=120) as r:
                self.status = r.status_code
                self.first.set()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.first_data.set()
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.first.set()
            self.first_data.set()

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
    assert running.first_data.wait(30) and running.status == 200
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


@pytest.mark.slow
def test_second_sigterm_stops_at_once(server_model_dir, tmp_path):
    """A second signal aborts what is in flight: each stream ends with an error event and [DONE], the log has no
    tracebacks, and the exit status says the server was stopped (128 + SIGTERM)."""
    proc = ServerProcess([str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "8MiB",
                          "--max-num-seqs", "2", "--shutdown-timeout", "60"], tmp_path / "server.log")
    try:
        proc.wait_ready()
        streams = [Stream(proc, LONG) for _ in range(2)]
        for stream in streams:
            stream.start()
            assert stream.first.wait(30) and stream.status == 200
        proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(proc.url + "/health").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        start = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(10) == 128 + signal.SIGTERM
        assert time.monotonic() - start < 3
        for stream in streams:
            stream.join(10)
            assert stream.error is None, stream.error
            assert stream.events[-1] == "[DONE]", stream.events[-3:]
            error = json.loads(stream.events[-2])["error"]
            assert error["code"] == "shutdown" and "stopped" in error["message"], error
        log = proc.log()
        assert "Traceback" not in log and "CancelledError" not in log, log
        assert "Second SIGTERM: stopping now, 2 requests aborted" in log
    finally:
        proc.stop()


def test_unusable_usage_log_fails_start_up(server_model_dir, tmp_path):
    proc = ServerProcess([str(server_model_dir), "--usage-log", str(tmp_path)], tmp_path / "server.log")
    try:
        assert proc.proc.wait(60) != 0
    finally:
        proc.stop()
    assert f"--usage-log {tmp_path} is a directory" in proc.log()


@pytest.mark.slow
def test_engine_load_failure_is_logged_and_exits_1(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    proc = ServerProcess([str(empty)], tmp_path / "server.log")
    try:
        assert proc.proc.wait(60) == 1
    finally:
        proc.stop()
    assert "start-up failed" in proc.log()


def test_server_status_is_an_enum_that_health_reports():
    import typing

    from tokenmill.entrypoints.openai.api_server import ServerState, ServerStatus
    from tokenmill.entrypoints.openai.protocol import HealthResponse
    from tokenmill.entrypoints.openai.server_config import ServerConfig

    assert {s.value for s in ServerStatus} == set(typing.get_args(HealthResponse.model_fields["status"].annotation))
    state = ServerState(ServerConfig(), engine_config=None, model_names=["m"])  # type: ignore[arg-type]
    assert state.status is ServerStatus.LOADING
