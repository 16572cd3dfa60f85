"""Real processes for the router tests: two `tokenmill serve` replicas of a "local" tier, a "cloud" tier (another
tokenmill server with its own API key), and `tokenmill route` processes in front of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.entrypoints.openai.conftest import ServerProcess

LOCAL_MODEL = "tiny-local"
CLOUD_MODEL = "cloud-mid"
CLOUD_KEY = "sk-cloud-secret"
CLOUD_KEY_ENV = "TOKENMILL_TEST_CLOUD_KEY"
# A second key of the cloud server, allowed 1 request per minute: the backend answers 429 after that.
CLOUD_LIMITED_KEY = "sk-cloud-limited"
CLOUD_LIMITED_KEY_ENV = "TOKENMILL_TEST_CLOUD_LIMITED_KEY"
GPU_HOURLY = 2.99
CLOUD_PRICE = {"input_per_1m": 150.0, "output_per_1m": 600.0}
MAX_MODEL_LEN = 512
SERVE_ARGS = ["--dtype", "float32", "--kv-cache-memory", "8MiB", "--max-model-len", str(MAX_MODEL_LEN),
              "--log-stats-interval", "0", "--disable-uvicorn-access-log"]


def serve_args(model_dir: Path, name: str, *extra: str) -> list[str]:
    return [str(model_dir), *SERVE_ARGS, "--served-model-name", name, *extra]


class RouterProcess(ServerProcess):
    """`tokenmill route --config ...` as a subprocess."""

    def __init__(self, config: dict, workdir: Path, name: str, env: dict | None = None) -> None:
        import yaml

        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        super().__init__(["--config", str(self.config_path)], workdir / f"{name}.log", command="route", env=env)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        values = {}
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=10).text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values


@pytest.fixture(scope="session")
def router_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("router")


@pytest.fixture(scope="session")
def local_replicas(server_model_dir, router_dir):
    """Two replicas of the local tier."""
    procs = [ServerProcess(serve_args(server_model_dir, LOCAL_MODEL), router_dir / f"local{i}.log") for i in range(2)]
    try:
        yield [p.wait_ready() for p in procs]
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="session")
def cloud_server(server_model_dir, router_dir):
    """The "cloud" tier: another tokenmill server, with its own API key."""
    keys = router_dir / "cloud-keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "router", "key": CLOUD_KEY},
                                         {"name": "limited", "key": CLOUD_LIMITED_KEY, "requests_per_minute": 1}]}))
    proc = ServerProcess(serve_args(server_model_dir, CLOUD_MODEL, "--api-keys-file", str(keys)),
                         router_dir / "cloud.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def cloud_env() -> dict[str, str]:
    return {CLOUD_KEY_ENV: CLOUD_KEY, CLOUD_LIMITED_KEY_ENV: CLOUD_LIMITED_KEY}


def backends_config(local_replicas, cloud_server) -> dict:
    return {
        "local-small": {"urls": [p.base_url for p in local_replicas], "model": LOCAL_MODEL,
                        "price": {"gpu_hourly": GPU_HOURLY}},
        "cloud-mid": {"urls": [cloud_server.base_url], "model": CLOUD_MODEL, "api_key_env": CLOUD_KEY_ENV,
                      "price": dict(CLOUD_PRICE)},
        # The same server through a key limited to 1 request per minute.
        "cloud-limited": {"urls": [cloud_server.base_url], "model": CLOUD_MODEL, "api_key_env": CLOUD_LIMITED_KEY_ENV,
                          "price": dict(CLOUD_PRICE)},
    }


class FixedPortServer(ServerProcess):
    """ServerProcess on a chosen port, so that a killed replica can come back at the same URL."""

    def __init__(self, args: list[str], log_path: Path, port: int) -> None:
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = self.url + "/v1"
        cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", *args, "--host", "127.0.0.1",
               "--port", str(port)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        self._log = open(log_path, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout} s")
