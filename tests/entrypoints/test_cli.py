"""The `tokenmill` command line: --version, and errors shown with the usage of the subcommand at fault."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tokenmill


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_version():
    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"tokenmill {tokenmill.__version__}"


@pytest.mark.parametrize("prog,args", [("serve", []), ("generate", []), ("bench serve", ["--base-url", "http://x"]),
                                       ("plan", [])])
def test_unknown_flag_shows_the_subcommand_usage(prog, args):
    result = _cli(*prog.split(), *args, "--no-such-flag")
    assert result.returncode == 2
    assert result.stderr.startswith(f"usage: tokenmill {prog} "), result.stderr[:300]
    assert "unrecognized arguments: --no-such-flag" in result.stderr


def test_bench_help_shows_num_prompts_default():
    result = _cli("bench", "throughput", "--help")
    assert result.returncode == 0
    assert "number of requests (default: 64)" in " ".join(result.stdout.split())


def test_serve_refuses_a_directory_as_usage_log(tmp_path):
    result = _cli("serve", str(tmp_path), "--usage-log", str(tmp_path))
    assert result.returncode == 2
    assert f"--usage-log {tmp_path} is a directory" in result.stderr
