"""The GPU benchmark's CPU-runnable parts: its command line, and its decode and overhead sections on a tiny model,
which read the engine only through engine_info() and the step timing utility calls (StepTimers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_help_runs():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "bench.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--tiny" in result.stdout and "--skip" in result.stdout


@pytest.fixture
def bench(tmp_path):
    from benchmarks.gpu.bench import Bench, parse_args

    return Bench(parse_args(["--tiny", "--out", str(tmp_path), "--decode-steps", "3"]))


def test_decode_and_overhead_sections_on_cpu(bench, llama_dir):
    from benchmarks.gpu.engine_hooks import STAGES

    llm, info = bench.open_engine(llama_dir, max_num_seqs=8, max_model_len=128, max_num_batched_tokens=256)
    try:
        facts = llm.llm_engine.engine_info()
        assert info["attention_backend"] == facts["attention_backend"] and info["cuda_graph_sizes"] is None
        assert info["num_kv_blocks"] == facts["num_kv_blocks"] > 0

        decode = bench.decode(llm, 2)
        assert decode["median_step_ms"] > 0 and decode["weight_bytes"] == facts["weight_bytes_read_per_step"]
        # K and V of every token the two sequences attend over, over all layers.
        assert decode["kv_bytes"] >= facts["kv_bytes_per_token"] * 2 * bench.args.context

        for async_scheduling in (False, True):
            out = bench.overhead(llm, 4, async_scheduling)
            assert out["num_steps"] == out["num_timed_steps"] == bench.args.decode_steps
            for stage in ("schedule", "launch", "update", "build_batch", "forward", "logits", "sample"):
                assert out[f"{stage}_ms"] > 0, (stage, out)
            assert {f"{s}_ms" for s in STAGES if s != "step"} <= out.keys()
            assert out["core_step_ms"] <= out["engine_step_ms"] == out["step_ms"]
            assert 0 < out["cpu_share"] < 1
        # Timing is switched off again after the measurement.
        llm.generate([[1, 2, 3]], use_tqdm=False)
        assert llm.llm_engine.take_step_timings() == []
    finally:
        llm.llm_engine.shutdown()
