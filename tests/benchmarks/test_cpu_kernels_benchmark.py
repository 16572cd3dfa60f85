"""benchmarks/cpu_kernels.py runs end to end on small shapes (its timings are not checked)."""

from __future__ import annotations

import json

import pytest

from benchmarks.cpu_kernels import main
from tokenmill.kernels.cpu import ops as cpu_kernels


@pytest.mark.skipif(not cpu_kernels.layer_ops_supported(), reason="native kernels need a C compiler and AVX512-BF16")
def test_cpu_kernels_benchmark_runs(tmp_path):
    out = tmp_path / "kernels.json"
    assert main(["--layers", "1", "--context", "40", "--long-context", "200", "--hidden", "64",
                 "--intermediate", "96", "--vocab", "500", "--repeat", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5 and all(r["native_ms"] > 0 and r["pytorch_ms"] > 0 for r in rows)
