"""tokenmill bench quality: quantized vs full precision on the same prompts."""

from __future__ import annotations

import json

import pytest

from tokenmill.benchmarks.quality import ScoredModel, compare, sequence_logprobs
from tokenmill.entrypoints.cli import main


@pytest.mark.slow  # three engines
def test_compare_scores_itself_perfectly_and_a_quantized_copy_less(llama_dir):
    reference = ScoredModel(str(llama_dir), dtype="float32")
    same = ScoredModel(str(llama_dir), dtype="float32")
    int4 = ScoredModel(str(llama_dir), dtype="float32", quantization="int4")
    results = {r.name: r for r in compare(reference, {"same": same, "int4": int4}, ["hello there", "1 2 3"], 8)}
    assert results["same"].mean_kl < 1e-6
    assert results["same"].top1_agreement == results["same"].greedy_agreement == 1.0
    assert results["same"].num_tokens == 16
    assert results["int4"].mean_kl > 1e-4  # the random tiny model is far from int4-friendly
    assert 0 <= results["int4"].top1_agreement <= 1 and 0 <= results["int4"].greedy_agreement <= 1


def test_sequence_logprobs_match_the_engines_sampling(llama_dir):
    scored = ScoredModel(str(llama_dir), dtype="float32")
    llm = scored.llm
    from tokenmill import SamplingParams

    prompt = [5, 6, 7, 8, 9]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=4),
                       use_tqdm=False)[0].outputs[0].token_ids
    logprobs = sequence_logprobs(scored, prompt + list(out))
    # Teacher-forced argmax at each position equals the token greedy decoding chose there.
    assert logprobs[len(prompt) - 1:-1].argmax(-1).tolist() == list(out)


@pytest.mark.slow  # two engines
def test_bench_quality_cli(llama_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    out = tmp_path / "quality.json"
    assert main(["bench", "quality", "--model", str(llama_dir), "--quantization", "int8", "--prompts-file",
                 str(prompts), "--max-tokens", "4", "--dtype", "float32", "--json", str(out)]) == 0
    assert "int8" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["num_prompts"] == 2 and [r["name"] for r in data["results"]] == ["int8"]
