"""`bench throughput` on a tiny random-weight model with a few requests."""

from __future__ import annotations

import json

import pytest

from tokenmill.benchmarks.datasets import prefix_repetition_requests, random_requests
from tokenmill.benchmarks.metrics import compute_metrics
from tokenmill.benchmarks.throughput import run_offline
from tokenmill.entrypoints.cli import main


@pytest.fixture(scope="module")
def llm(llama_dir):
    from tokenmill import LLM

    return LLM(str(llama_dir), max_model_len=256, kv_cache_memory="32MiB", show_progress=False)


def test_each_request_gets_its_output_length_within_the_concurrency_limit(llm):
    requests = random_requests(llm.get_tokenizer(), 5, input_len=(8, 24), output_len=(2, 7), seed=2)
    run = run_offline(llm, requests, max_concurrency=2, use_tqdm=False)
    assert [r.output_len for r in run.results] == [r.expected_output_len for r in requests]
    assert [r.prompt_len for r in run.results] == [r.prompt_len for r in requests]
    for result in run.results:
        assert len(result.itl) == result.output_len - 1
        assert 0 < result.ttft <= result.latency
    metrics = compute_metrics(run.results, run.duration_s)
    assert metrics.max_concurrency_observed == 2
    assert metrics.total_output_tokens == sum(r.expected_output_len for r in requests)
    assert run.num_steps > 0 and run.engine_stats()["busy_fraction"] > 0


def test_prefix_caching_hits_and_profile(llm):
    requests = prefix_repetition_requests(
        llm.get_tokenizer(), 4, prefix_len=48, suffix_len=4, num_prefixes=1, output_len=3, seed=0
    )
    run = run_offline(llm, requests, max_concurrency=1, use_tqdm=False, profile_steps=1)
    assert len(run.results) == 4
    assert llm.llm_engine.core.kv_cache_manager.pool.num_free_blocks > 0
    assert run.profile is not None and "torch operators" in run.profile and "engine_core.py" in run.profile


def test_cli_writes_json_and_plots(llama_dir, tmp_path, capsys):
    json_path, plot_dir = tmp_path / "throughput.json", tmp_path / "plots"
    rc = main(
        [
            "bench",
            "throughput",
            str(llama_dir),
            "--max-model-len",
            "256",
            "--kv-cache-memory",
            "32MiB",
            "--num-prompts",
            "3",
            "--input-len",
            "8-16",
            "--output-len",
            "2-4",
            "--max-concurrency",
            "1,3",
            "--json",
            str(json_path),
            "--plot",
            str(plot_dir),
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "Offline Benchmark (concurrency 3)" in out and "Output token throughput (tok/s):" in out
    data = json.loads(json_path.read_text())
    assert data["benchmark"] == "throughput" and data["dtype"] in ("bfloat16", "float32")
    assert data["machine"]["num_cpus"] >= 1 and data["engine"]["kv_cache_memory"] == "32MiB"
    assert [run["max_concurrency"] for run in data["runs"]] == [1, 3]
    for run in data["runs"]:
        assert run["metrics"]["num_completed"] == 3
        assert run["metrics"]["total_output_tokens"] == data["dataset"]["total_output_tokens"]
        assert run["engine_stats"]["num_steps"] > 0
    assert (plot_dir / "throughput_latency_cdf.png").is_file() and (
        plot_dir / "throughput_sweep.png"
    ).is_file()


def test_poisson_arrivals_offline(llm):
    requests = random_requests(llm.get_tokenizer(), 3, input_len=(8, 8), output_len=(2, 2), seed=5)
    run = run_offline(llm, requests, request_rate=20.0, seed=5, use_tqdm=False)
    starts = [r.start_time for r in run.results]
    assert starts == sorted(starts) and starts[-1] > 0.0
    assert all(r.output_len == 2 for r in run.results)
