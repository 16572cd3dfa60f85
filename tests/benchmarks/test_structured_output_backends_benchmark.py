"""benchmarks/structured_output_backends.py runs end to end on the tiny tokenizer (its timings are not checked)."""

from __future__ import annotations

import json

import pytest

from benchmarks.structured_output_backends import main


@pytest.mark.slow
def test_structured_output_backends_benchmark_runs(tmp_path):
    out = tmp_path / "so.json"
    assert main(["--tokenizers", "tiny", "--repeat", "1", "--batches", "2", "--no-llguidance-kernel",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())["tokenizers"]["tiny BPE (384 tokens)"]
    assert [row["backend"] for row in result["backends"]] == ["xgrammar", "guidance"]
    for row in result["backends"]:
        assert len(row["compile_cold_ms"]) == 3 and row["fill_us"] > 0 and row["num_tokens"] > 30
    assert all(r["xgrammar_ms"] > 0 and r["torch_ms"] > 0 for r in result["apply"])
