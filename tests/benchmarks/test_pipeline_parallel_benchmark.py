"""benchmarks/pipeline_parallel.py runs PP=1 and PP=2 side by side and reports each stage's busy fraction."""

from __future__ import annotations

import json

import pytest

from benchmarks import pipeline_parallel


@pytest.mark.slow  # three worker processes (PP=1, then PP=2) load the tiny model (~15 s)
def test_pipeline_parallel_benchmark_smoke(llama_dir, tmp_path, capsys):
    out = tmp_path / "pp.json"
    pipeline_parallel.main(["--model", str(llama_dir), "--num-prompts", "4", "--input-len", "16", "--output-len",
                            "4", "--dtype", "float32", "--kv-cache-memory", "4MiB", "--scheduling", "async",
                            "--json", str(out)])
    one, two = json.loads(out.read_text())["results"]
    assert (one["pipeline_parallel_size"], two["pipeline_parallel_size"]) == (1, 2)
    assert one["output_tokens"] == two["output_tokens"] == 16
    assert "stages" not in one
    assert [s["layers"] for s in two["stages"]] == [[0, 1], [1, 2]]
    assert all(0 < s["busy_fraction"] <= 1 for s in two["stages"])
    assert two["overlap"] == pytest.approx(sum(s["busy_s"] for s in two["stages"]) / two["wall_s"])
    assert "stage busy fractions" in capsys.readouterr().out
