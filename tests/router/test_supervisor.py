"""`launch:` backends: the router starts a `tokenmill serve` replica, routes to it, restarts it after a kill."""

from __future__ import annotations

import os
import signal

import httpx
import openai
import pytest

from tests.entrypoints.openai.conftest import assert_openai_error
from tests.router.conftest import SERVE_ARGS, RouterProcess, wait_for

pytestmark = pytest.mark.slow

MODEL = "tiny-launched"


def _launched(router: RouterProcess) -> dict:
    return router.health()["backends"]["launched"][0]


def test_launched_backend_serves_and_is_restarted(server_model_dir, tmp_path):
    config = {
        "backends": {"launched": {"launch": {"model": str(server_model_dir), "args": list(SERVE_ARGS),
                                             "log_dir": str(tmp_path / "replicas"), "restart_delay_s": 0.2},
                                  "model": MODEL}},
        "routes": [{"name": "only", "match": {"model": MODEL}, "backend": "launched"}],
        "health": {"interval_s": 0.5},
    }
    router = RouterProcess(config, tmp_path, "router")
    pid = None
    try:
        router.wait_ready(timeout=180)  # 200 once the launched replica has loaded
        client = openai.OpenAI(base_url=router.base_url, api_key="x", max_retries=0)
        r = client.completions.create(model=MODEL, prompt="hello", max_tokens=3)
        assert r.model == MODEL and r.usage.completion_tokens == 3
        # No "*" route: another model name gets 404 listing the routes.
        error = assert_openai_error(httpx.post(router.base_url + "/completions",
                                               json={"model": "other", "prompt": "x"}), 404)
        assert "only" in error["message"] and MODEL in error["message"]
        pid = _launched(router)["pid"]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _launched(router)["pid"] not in (None, pid), 30, what="restart")
        wait_for(lambda: _launched(router)["healthy"], 120, interval=0.3, what="re-admission")
        r = client.completions.create(model=MODEL, prompt="hello again", max_tokens=3)
        assert r.usage.completion_tokens == 3
        assert router.metrics()["tokenmill_router:backend_restarts_total{backend=launched}"] == 1
        new_pid = _launched(router)["pid"]
    finally:
        assert router.stop() == 0
    # The router stops its replicas when it stops.
    with pytest.raises(ProcessLookupError):
        os.kill(new_pid, 0)
