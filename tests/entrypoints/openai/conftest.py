"""Real `tokenmill serve` processes on free loopback ports, shared per session where they can be."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "sk-test-alice"
LIMITED_KEY = "sk-test-limited"  # 2 requests per minute
TPM_KEY = "sk-test-tpm"  # 100 tokens per minute
TIGHT_FEATURE = "tight-feature"  # 1 request per minute, over all keys
# Contains "/" as hub ids do (GET /v1/models/{id} must route it).
MODEL_NAME = "tokenmill-tests/tiny"
MAX_MODEL_LEN = 512
MAX_TOKENS_LIMIT = 500
GPU_HOURLY_COST = 3.6
# limits_server's waiting queue (--max-queue-len), prompt cap and CORS origin.
LIMITS_MAX_QUEUE_LEN = 4
LIMITS_MAX_PROMPTS = 4
LIMITS_ORIGIN = "http://app.example"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`tokenmill serve ...` (or another serving subcommand, such as `route`) as a subprocess on a free loopback
    port; its output goes to a log file read on failure."""

    def __init__(self, args: list[str], log_path: Path, command: str = "serve", env: dict | None = None) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", command, *args,
               "--host", "127.0.0.1", "--port", str(self.port)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
                   **(env or {}))
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def metrics(self) -> dict[str, float]:
        """Sample name with labels -> value, parsed with prometheus_client's parser."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Metrics once nothing runs or waits (and the last finished requests are recorded)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout} s: {m}")
            time.sleep(0.05)


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


@pytest.fixture(scope="session")
def server_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="session")
def server(server_model_dir, server_dir):
    """The main server: API keys with limits, usage log, a max_tokens cap, stats logged every second."""
    keys_file = server_dir / "keys.json"
    keys_file.write_text(json.dumps({
        "keys": [
            {"name": "alice", "key": API_KEY},
            {"name": "limited", "key": LIMITED_KEY, "requests_per_minute": 2},
            {"name": "tpm", "key": TPM_KEY, "tokens_per_minute": 100},
        ],
        "features": {TIGHT_FEATURE: {"requests_per_minute": 1}},
    }))
    proc = ServerProcess([
        str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "16MiB", "--max-model-len",
        str(MAX_MODEL_LEN), "--served-model-name", MODEL_NAME, "--api-keys-file", str(keys_file),
        "--max-tokens-limit", str(MAX_TOKENS_LIMIT), "--usage-log", str(server_dir / "usage.jsonl"),
        "--gpu-hourly-cost", str(GPU_HOURLY_COST), "--log-stats-interval", "1",
    ], server_dir / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def limits_server(server_model_dir, tmp_path_factory):
    """Tight per-client limits: one batch slot, a waiting queue of 4, small bodies, few prompts; CORS flags."""
    proc = ServerProcess([
        str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "8MiB", "--max-num-seqs", "1",
        "--max-queue-len", str(LIMITS_MAX_QUEUE_LEN), "--header-read-timeout", "1",
        "--max-prompts-per-request", str(LIMITS_MAX_PROMPTS), "--max-choices-per-request", "6",
        "--max-request-body-bytes", "2000", "--allowed-origins", LIMITS_ORIGIN,
        "--allowed-methods", '["GET", "POST"]', "--allowed-headers", "authorization", "--allowed-headers",
        "content-type", "--allow-credentials",
    ], tmp_path_factory.mktemp("limits") / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def burst(url: str, body: dict, num_requests: int, times: dict[str, float] | None = None
          ) -> list[tuple[int, dict | None]]:
    """num_requests simultaneous POSTs of body: (200, None) for each admitted one, else (status, error body with
    its retry-after header). An admitted stream is read to its first event and held open until every request of
    the burst has been answered (so no admitted request ends and frees its place while others are still arriving),
    then closed, aborting it; an admitted non-streamed request is read whole. times, if given, receives "start"
    (time.monotonic() when the requests were let go) and "last_refusal" (when the last refused one was answered).
    """

    async def run() -> list[tuple[int, dict | None]]:
        limits = httpx.Limits(max_connections=2 * num_requests)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            start = asyncio.Event()
            all_answered = asyncio.Event()
            answered = 0

            def answer() -> None:
                nonlocal answered
                answered += 1
                if answered == num_requests:
                    all_answered.set()

            async def one() -> tuple[int, dict | None]:
                await start.wait()
                async with client.stream("POST", url, json=body) as r:
                    answer()
                    if r.status_code != 200:
                        await r.aread()
                        if times is not None:
                            times["last_refusal"] = time.monotonic()
                        return r.status_code, {**r.json(), "retry-after": r.headers.get("retry-after")}
                    if not body.get("stream"):
                        await r.aread()
                        return 200, None
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break
                    await all_answered.wait()
                    return 200, None

            tasks = [asyncio.create_task(one()) for _ in range(num_requests)]
            await asyncio.sleep(0.1)
            if times is not None:
                times["start"] = time.monotonic()
            start.set()
            return [await task for task in tasks]

    return asyncio.run(run())


def queue_burst(server: ServerProcess, url: str, body: dict, num_requests: int,
                times: dict[str, float] | None = None) -> tuple[int, float]:
    """burst() against server, watching its waiting count: (requests admitted, most requests seen waiting).
    Every refused request must be a 503 queue_full with a Retry-After. times: as burst's."""
    waiting_seen: list[float] = []
    stop = threading.Event()

    def watch_waiting() -> None:
        while not stop.is_set():
            waiting_seen.append(server.metrics()["vllm:num_requests_waiting"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_waiting, daemon=True)
    watcher.start()
    try:
        results = burst(url, body, num_requests, times)
    finally:
        stop.set()
        watcher.join(10)
    for status, error in results:
        if status != 200:
            assert status == 503 and error is not None and error["error"]["code"] == "queue_full", error
            assert int(error["retry-after"]) >= 1
    return sum(status == 200 for status, _ in results), max(waiting_seen, default=0)


@pytest.fixture(scope="session")
def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def offline_llm(server_model_dir):
    """The offline API on the same model and dtype, for greedy comparisons."""
    from tokenmill import LLM

    return LLM(str(server_model_dir), dtype="float32", kv_cache_memory="16MiB", max_model_len=MAX_MODEL_LEN,
               show_progress=False)


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    """The response is an error (status, else any 4xx) in OpenAI's shape; returns the error object."""
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text)
    else:
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    return error
