"""`bench serve` against a fake OpenAI-compatible streaming server on loopback."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.fake_server import FakeOpenAIServer
from tokenmill.benchmarks.datasets import SampleRequest
from tokenmill.benchmarks.serve import ServeTarget, run_serve_sync
from tokenmill.entrypoints.cli import main


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer(ttft_s=0.02, itl_s=0.002) as server:
        yield server


def _requests(output_lens: list[int]) -> list[SampleRequest]:
    return [SampleRequest(f"prompt {i}", [1, 2, 3, i], n) for i, n in enumerate(output_lens)]


def test_streamed_timings_and_concurrency_limit(server):
    run = run_serve_sync(
        ServeTarget(server.base_url), _requests([3, 5, 8, 2, 6]), max_concurrency=2, use_tqdm=False
    )
    assert run.model == "fake-model"
    assert server.max_in_flight <= 2
    assert [r.output_len for r in run.results] == [3, 5, 8, 2, 6]
    for result in run.results:
        assert result.success, result.error
        assert result.ttft >= 0.02
        assert len(result.itl) == result.output_len - 1
        assert result.latency >= result.ttft + sum(result.itl) - 1e-6
        assert result.prompt_len == 4
    payload = server.payloads[-1]
    assert payload["stream"] is True and payload["ignore_eos"] is True and payload["temperature"] == 0.0
    assert payload["stream_options"] == {"include_usage": True}


def test_chat_endpoint_poisson_arrivals_and_failures(server):
    requests = _requests([4, 4, 4]) + [SampleRequest("please FAIL", [1], 4)]
    target = ServeTarget(server.base_url + "/v1", endpoint="chat", ignore_eos=False)
    run = run_serve_sync(target, requests, request_rate=40.0, seed=1, use_tqdm=False)
    ok = [r for r in run.results if r.success]
    assert len(ok) == 3 and all(r.output_len == 4 and len(r.itl) == 3 for r in ok)
    failed = run.results[-1]
    assert not failed.success and failed.error.startswith("HTTP 500")
    # Seeded Poisson arrivals: requests start at increasing offsets, not all at once.
    starts = [r.start_time for r in run.results]
    assert starts == sorted(starts) and starts[-1] > 0.0
    assert "messages" in server.payloads[-1] and "ignore_eos" not in server.payloads[-1]


def test_cli_sweep_writes_json_and_plots(server, llama_dir, tmp_path, capsys):
    json_path, plot_dir = tmp_path / "serve.json", tmp_path / "plots"
    rc = main(
        [
            "bench",
            "serve",
            "--base-url",
            server.base_url,
            "--tokenizer",
            str(llama_dir),
            "--num-prompts",
            "4",
            "--input-len",
            "8-16",
            "--output-len",
            "3-6",
            "--max-concurrency",
            "1,2",
            "--json",
            str(json_path),
            "--plot",
            str(plot_dir),
            "--save-detailed",
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "Serving Benchmark (concurrency 1)" in out and "P99 ITL (ms):" in out
    data = json.loads(json_path.read_text())
    assert data["benchmark"] == "serve" and data["model"] == "fake-model"
    assert data["dataset"]["name"] == "random" and data["dataset"]["num_prompts"] == 4
    assert [run["max_concurrency"] for run in data["runs"]] == [1, 2]
    for run in data["runs"]:
        metrics = run["metrics"]
        assert metrics["num_completed"] == 4 and metrics["num_failed"] == 0
        assert metrics["total_output_tokens"] == data["dataset"]["total_output_tokens"]
        assert set(metrics["latency"]) == {"ttft", "tpot", "itl", "e2el"}
        assert set(metrics["latency"]["ttft"]["percentiles"]) == {"p90", "p99"}
        assert len(run["requests"]) == 4
    assert data["runs"][0]["metrics"]["max_concurrency_observed"] == 1
    for name in ("serve_latency_cdf.png", "serve_sweep.png"):
        assert (plot_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_unreachable_server_is_a_clear_error(llama_dir, capsys):
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rc = main(
        [
            "bench",
            "serve",
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--tokenizer",
            str(llama_dir),
            "--num-prompts",
            "1",
            "--input-len",
            "4",
            "--output-len",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 2
    assert "check that the server is running" in capsys.readouterr().err
