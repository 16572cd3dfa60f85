"""Real `tokenmill serve` processes on free loopback ports, shared per session where they can be."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`tokenmill serve ...` as a subprocess; its output goes to a log file read on failure."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", *args,
               "--host", "127.0.0.1", "--port", str(self.port)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
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
