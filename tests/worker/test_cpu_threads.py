"""OpenMP wait policy and torch thread count on CPU (tokenmill/worker/cpu_threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tokenmill.worker import cpu_threads

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in cpu_threads.WAIT_POLICY_VARS}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)


def test_import_tokenmill_makes_waiting_openmp_threads_sleep():
    code = "import os, tokenmill; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert run_python(code).stdout.strip() == "PASSIVE"
    # The user's choice stands, whichever variable says it.
    assert run_python(code, OMP_WAIT_POLICY="ACTIVE").stdout.strip() == "ACTIVE"
    assert run_python(code, GOMP_SPINCOUNT="10000").stdout.strip() == "None"


@pytest.mark.slow  # two fresh processes importing torch
def test_engine_warns_when_torch_was_imported_first():
    code = ("import logging, torch, tokenmill; logging.basicConfig();"
            "from tokenmill.worker.cpu_threads import check_cpu_threads; check_cpu_threads()")
    assert "torch was imported before tokenmill" in run_python(code).stderr
    code = ("import logging, tokenmill, torch; logging.basicConfig();"
            "from tokenmill.worker.cpu_threads import check_cpu_threads; check_cpu_threads()")
    assert "torch was imported before tokenmill" not in run_python(code).stderr


def test_torch_threads_capped_to_the_usable_cpus(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        assert cpu_threads.usable_cpus() == 2
        cpu_threads.check_cpu_threads()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
