"""`tokenmill serve --distributed-executor-backend ray` with no Ray cluster to join: the engine starts a local one
(and says so), answers through the official client with tensor parallelism over two Ray actors, and stops what it
started when the server stops. (Its own module: the cluster of test_ray_executor.py would be found and joined.)"""

from __future__ import annotations

import shutil
import tempfile

import psutil
import pytest

from tests.entrypoints.openai.conftest import ServerProcess


def _running_ray_clusters() -> list[int]:
    """Pids of GCS servers on this machine (any Ray cluster, which Ray's "auto" address would join)."""
    found = []
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "gcs_server":
            found.append(process.pid)
    return found


@pytest.mark.slow
def test_serve_starts_a_local_ray_cluster_and_stops_it(server_model_dir, tmp_path, monkeypatch):
    import openai

    if _running_ray_clusters():
        pytest.skip("a Ray cluster already runs on this machine: the engine would join it instead of starting one")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # A fresh Ray temp dir (short: Ray's socket paths must stay under 108 bytes), no token authentication, and one
    # CPU per rank.
    ray_tmp = tempfile.mkdtemp(prefix="tmray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("TOKENMILL_RAY_PER_WORKER_CPUS", "1")
    server = ServerProcess([
        str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "4MiB", "--max-model-len", "128",
        "--served-model-name", "tiny", "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray",
    ], tmp_path / "server.log")
    descendants: list[psutil.Process] = []
    try:
        server.wait_ready(timeout=240)
        client = openai.OpenAI(base_url=server.base_url, api_key="none")
        completion = client.completions.create(model="tiny", prompt="Hello, my name is", max_tokens=5,
                                               temperature=0)
        assert completion.usage.completion_tokens == 5 and completion.choices[0].text
        log = server.log()
        assert "no running cluster found" in log and "starting a local one" in log, log
        descendants = psutil.Process(server.proc.pid).children(recursive=True)
        names = {p.name() for p in descendants}
        assert "gcs_server" in names and "raylet" in names, names  # the cluster is the engine's own
    finally:
        server.stop()
        _, alive = psutil.wait_procs(descendants, timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [(p.pid, p.name()) for p in alive]
