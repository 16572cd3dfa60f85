"""/live: the liveness probe answers 200 while the server loads and while it drains, when /health says 503."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.entrypoints.openai.conftest import ServerProcess
from tests.entrypoints.openai.test_lifecycle import LONG, Stream


@pytest.mark.slow
def test_live_stays_200_through_loading_and_draining(server_model_dir, tmp_path):
    server = ServerProcess([str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "8MiB",
                            "--max-num-seqs", "1", "--shutdown-timeout", "60"], tmp_path / "server.log")
    try:
        seen = set()
        deadline = time.monotonic() + 120
        while True:
            assert server.proc.poll() is None, server.log()
            assert time.monotonic() < deadline, server.log()
            try:
                live = httpx.get(server.url + "/live", timeout=2)
                health = httpx.get(server.url + "/health", timeout=2)
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            assert live.status_code == 200, live.text
            seen.add(live.json()["status"])
            if health.status_code == 200:
                break
            assert health.json() == {"status": "loading"}
        # The engine loads in a thread after the port opens; /live answered 200 all along.
        assert seen <= {"loading", "ok"}, seen

        running = Stream(server, LONG)
        running.start()
        assert running.first.wait(30) and running.status == 200
        server.proc.send_signal(signal.SIGTERM)
        while (health := httpx.get(server.url + "/health")).status_code == 200:
            time.sleep(0.02)
        assert health.json() == {"status": "draining"}
        live = httpx.get(server.url + "/live")
        assert live.status_code == 200 and live.json() == {"status": "draining"}
        running.join(60)
        assert running.error is None and running.summary()[0] == "length"
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
