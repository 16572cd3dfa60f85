"""A real `tokenmill serve` on loopback for the monitoring tests (Prometheus scrape, dashboard metric names)."""

from __future__ import annotations

import pytest

from tests.entrypoints.openai.conftest import ServerProcess

API_KEY = "sk-deploy-test"
GPU_HOURLY_COST = 36.0


@pytest.fixture(scope="session")
def monitored_server(server_model_dir, tmp_path_factory):
    """A server with an API key and a GPU price, so the auth and cost metrics have samples once used."""
    log_dir = tmp_path_factory.mktemp("monitored_server")
    proc = ServerProcess([str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "8MiB",
                          "--max-model-len", "512", "--served-model-name", "tiny", "--api-key", API_KEY,
                          "--gpu-hourly-cost", str(GPU_HOURLY_COST)], log_dir / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()
