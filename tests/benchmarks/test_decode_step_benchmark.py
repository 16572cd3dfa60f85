"""benchmarks/decode_step.py runs the fused step and the op-by-op path side by side and reports both."""

from __future__ import annotations

import json

import pytest

from benchmarks import decode_step
from tokenmill.kernels.cpu import ops


@pytest.mark.slow  # two engine runs and the kernels timed alone: ~8 s on a loaded 2-core machine
@pytest.mark.skipif(not ops.layer_ops_supported(), reason="the fused decode step needs AVX512-BF16")
def test_decode_step_smoke(tiny_models, tmp_path, capsys):
    out = tmp_path / "decode.json"
    decode_step.main(["--model", str(tiny_models["llama"]), "--quantization", "int4", "--max-model-len", "256",
                      "--tokens", "6", "--rounds", "1", "--batch", "1,2", "--json", str(out)])
    results = json.loads(out.read_text())
    for batch in ("1", "2"):
        (run,) = results["batches"][batch]["rounds"]
        for path in ("fused", "op_by_op"):
            assert run[path]["num_decode_steps"] >= 4 and run[path]["forward_ms"] > 0
        assert run["ratio"] == pytest.approx(run["fused"]["tok_s"] / run["op_by_op"]["tok_s"])
        kernels = results["batches"][batch]["kernels_alone"]
        assert kernels["matmuls_ms"] > 0 and set(kernels["per_shape"]) == {"128x64", "64x64", "256x64", "64x128"}
    assert "fused / op-by-op" in capsys.readouterr().out
