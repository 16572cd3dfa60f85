"""benchmarks/host_overhead.py runs and reports every stage of the host's share of a step."""

from __future__ import annotations

import json

from benchmarks import host_overhead


def test_host_overhead_smoke(tmp_path, capsys):
    out = tmp_path / "host.json"
    host_overhead.main(["--batch", "8", "--context", "32", "--steps", "5", "--models-dir", str(tmp_path / "models"),
                        "--json", str(out)])
    results = json.loads(out.read_text())
    assert set(results["modes"]) == {"stream", "final", "async"}
    for mode in results["modes"].values():
        assert mode["num_steps"] == 5
        # The engine's step timing saw the model's forward and logits, and every host stage.
        assert mode["forward_ms"] > 0 and mode["logits_ms"] > 0
        assert mode["model_ms"] == mode["forward_ms"] + mode["logits_ms"]
        assert 0 < mode["cpu_ms"] < mode["step_ms"]
        assert all(mode[f"{s}_ms"] > 0 for s in host_overhead.STAGES)
    assert "host work of one decode step" in capsys.readouterr().out
