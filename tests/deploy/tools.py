"""Helpers for the deploy tests: the repository paths and the real tools they run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "tokenmill"
EXAMPLES = CHART / "examples"
PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "tokenmill-rules.yaml"
DASHBOARD = DEPLOY / "grafana" / "tokenmill-dashboard.json"


def require_tool(name: str, apt_package: str) -> str:
    """The path of a command-line tool; a skip here, a failure in CI (which installs it)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: apt-get install -y {apt_package}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
