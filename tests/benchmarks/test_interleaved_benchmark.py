"""benchmarks/interleaved.py steps two engines in turn over the same requests and compares them step by step."""

from __future__ import annotations

import json

import pytest

from benchmarks import interleaved


@pytest.mark.slow  # two engines of the tiny model, ~5 s
def test_interleaved_smoke(llama_dir, tmp_path, capsys):
    out = tmp_path / "interleaved.json"
    interleaved.main(["--model", str(llama_dir), "--quantization", "int4", "--max-model-len", "256",
                      "--concurrency", "3", "--num-prompts", "5", "--input-len", "8-24", "--output-len", "3-6",
                      "--json", str(out)])
    result = json.loads(out.read_text())
    plain, quant = result["engines"]
    assert (plain["label"], quant["label"]) == ("bfloat16", "int4")
    # Both engines generated every request's exact length (ignore_eos) over the same schedule.
    assert plain["output_tokens"] == quant["output_tokens"] >= 5 * 3
    assert plain["steps"] == quant["steps"] == result["b_over_a"]["matching_steps"] > 0
    for engine in (plain, quant):
        assert engine["busy_s"] > 0 and engine["output_tok_s"] == pytest.approx(
            engine["output_tokens"] / engine["busy_s"], rel=0.01)
        assert 0 < engine["mean_ttft_ms"] <= 1e3 * engine["busy_s"]
    ratio = result["b_over_a"]
    assert ratio["throughput_ratio"] == pytest.approx(quant["output_tok_s"] / plain["output_tok_s"], rel=0.01)
    assert ratio["median_step_ratio"] > 0
    # Every matching step falls in one kind: prefill (more tokens scheduled than sequences returned) or decode-only.
    kinds = ratio["by_step_kind"]
    assert kinds[0]["kind"] == "prefill" and sum(k["steps"] for k in kinds) == ratio["matching_steps"]
    assert sum(k["share_of_a"] for k in kinds) == pytest.approx(1.0, abs=0.01)
    prefill = [i for i, (tokens, outputs) in enumerate(zip(plain["step_tokens"], plain["step_outputs"], strict=True))
               if tokens > outputs]
    assert kinds[0]["steps"] == len(prefill) and kinds[0]["ratio"] == pytest.approx(
        sum(plain["step_ms"][i] for i in prefill) / sum(quant["step_ms"][i] for i in prefill), rel=0.01)
    assert plain["step_tokens"] == quant["step_tokens"]  # the same schedule
    printed = capsys.readouterr().out
    assert "int4 / bfloat16: output tok/s" in printed and "By kind of step" in printed
