"""/metrics (vLLM's names, parsed by prometheus_client), the usage log, client disconnects, /openapi.json."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from tests.entrypoints.openai.conftest import GPU_HOURLY_COST, MODEL_NAME

pytestmark = pytest.mark.slow  # drives tokenmill serve processes

VLLM_NAMES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
]
HISTOGRAMS = [
    "vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds", "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
]


def _post(server, headers, path, body, timeout=60) -> httpx.Response:
    r = httpx.post(server.base_url + path, headers=headers, json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return r


def _usage_records(server_dir) -> list[dict]:
    path = server_dir / "usage.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_metrics_names_and_values(server, auth_headers):
    shared = "A shared system prompt that is long enough to fill a couple of KV blocks. " * 3
    for suffix in ("one", "two"):
        _post(server, auth_headers, "/completions", {"prompt": shared + suffix, "max_tokens": 8, "ignore_eos": True})
    m = server.wait_idle()
    for name in VLLM_NAMES:
        assert name in m, name
    for name in HISTOGRAMS:
        assert m[f"{name}_count"] >= 1, name
        assert m[f"{name}_sum"] >= 0, name
        assert m[f"{name}_bucket{{le=+Inf}}"] == m[f"{name}_count"], name
    assert m["vllm:prompt_tokens_total"] > 0 and m["vllm:generation_tokens_total"] >= 16
    assert m["vllm:request_success_total{finished_reason=length}"] >= 2
    assert 0 < m["vllm:prefix_cache_hits_total"] <= m["vllm:prefix_cache_queries_total"]
    assert m["vllm:kv_cache_usage_perc"] == 0.0 and m["vllm:gpu_cache_usage_perc"] == 0.0
    assert m["tokenmill:engine_busy_seconds_total"] > 0


def test_metrics_text_has_model_name_label(server):
    text = httpx.get(server.url + "/metrics").text
    assert f'vllm:num_requests_running{{model_name="{MODEL_NAME}"}}' in text


def test_usage_log_one_record_per_request(server, server_dir, auth_headers):
    feature = f"usage-{uuid.uuid4().hex[:8]}"
    ids = []
    for i in range(3):
        r = _post(server, {**auth_headers, "X-Feature": feature}, "/completions",
                  {"prompt": f"usage {i}", "max_tokens": 4 + i, "ignore_eos": True})
        ids.append((r.json()["id"], r.json()["usage"]))
    r = _post(server, auth_headers, "/chat/completions",
              {"messages": [{"role": "user", "content": "usage"}], "max_tokens": 3, "metadata": {"feature": feature}})
    ids.append((r.json()["id"], r.json()["usage"]))
    server.wait_idle()
    deadline = time.monotonic() + 5
    while len(records := [x for x in _usage_records(server_dir) if x["feature"] == feature]) < 4:
        assert time.monotonic() < deadline, records
        time.sleep(0.05)
    assert len(records) == 4
    by_id = {x["request_id"]: x for x in records}
    for request_id, usage in ids:
        record = by_id[request_id]
        assert set(record) == {"request_id", "feature", "inference.backend", "model", "gpu_seconds", "input_tokens",
                               "cached_tokens", "output_tokens", "ttft_s", "e2e_s", "finish_reason", "cost_usd"}
        assert record["inference.backend"] == "tokenmill" and record["model"] == MODEL_NAME
        assert record["input_tokens"] == usage["prompt_tokens"]
        assert record["output_tokens"] == usage["completion_tokens"]
        assert record["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
        assert record["finish_reason"] in ("stop", "length")
        assert 0 < record["ttft_s"] <= record["e2e_s"]
        assert record["gpu_seconds"] > 0
        assert record["cost_usd"] == pytest.approx(GPU_HOURLY_COST / 3600 * record["gpu_seconds"])
    m = server.metrics()
    assert m[f"tokenmill:feature_requests_total{{feature={feature}}}"] == 4
    assert m[f"tokenmill:feature_output_tokens_total{{feature={feature}}}"] == sum(u["completion_tokens"]
                                                                                for _, u in ids)
    assert m[f"tokenmill:feature_gpu_seconds_total{{feature={feature}}}"] == pytest.approx(
        sum(x["gpu_seconds"] for x in records))


def test_usage_gpu_seconds_add_up_to_busy_time(server, server_dir, auth_headers):
    _post(server, auth_headers, "/completions", {"prompt": ["a", "b", "c"], "max_tokens": 6, "n": 2})
    deadline = time.monotonic() + 5
    while True:
        busy = server.wait_idle()["tokenmill:engine_busy_seconds_total"]
        total = sum(x["gpu_seconds"] for x in _usage_records(server_dir))
        if abs(total - busy) <= 0.05 * busy or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert total == pytest.approx(busy, rel=0.05)


def test_disconnect_mid_stream_frees_blocks(server, server_dir, auth_headers):
    feature = f"gone-{uuid.uuid4().hex[:8]}"
    body = {"prompt": "a long story", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/completions", json=body, timeout=30,
                      headers={**auth_headers, "X-Feature": feature}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None
    # The connection is closed: the request is aborted and its blocks freed at the next step.
    m = server.wait_idle()
    assert m["vllm:kv_cache_usage_perc"] == 0.0
    deadline = time.monotonic() + 5
    while not (records := [x for x in _usage_records(server_dir) if x["feature"] == feature]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert records[0]["finish_reason"] == "abort" and records[0]["output_tokens"] < 480
    assert server.metrics()["vllm:request_success_total{finished_reason=abort}"] >= 1


def test_stats_are_logged(server, auth_headers):
    _post(server, auth_headers, "/completions", {"prompt": "log me", "max_tokens": 4})
    deadline = time.monotonic() + 5
    while "Avg generation throughput" not in server.log():
        assert time.monotonic() < deadline, server.log()[-2000:]
        time.sleep(0.2)
    line = next(x for x in server.log().splitlines() if "Avg generation throughput" in x)
    for part in ("Running:", "Waiting:", "KV cache usage:", "Prefix cache hit rate:"):
        assert part in line


def test_openapi_schema(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
                 "/detokenize"):
        assert path in paths, path
    completions = paths["/v1/completions"]["post"]
    assert "422" not in completions["responses"] and "400" in completions["responses"]
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    request = schema["components"]["schemas"]["CompletionRequest"]
    assert request["additionalProperties"] is False
    for name in ("prompt", "max_tokens", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
                 "stop_token_ids", "stream_options", "logprobs", "seed"):
        assert name in request["properties"], name
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert "max_completion_tokens" in chat and "top_logprobs" in chat
    assert "ChatCompletionStreamResponse" in schema["components"]["schemas"]
    assert "HTTPBearer" in schema["components"].get("securitySchemes", {})


def test_disconnect_without_streaming_aborts(server, server_dir, auth_headers):
    feature = f"gone-{uuid.uuid4().hex[:8]}"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/completions", timeout=httpx.Timeout(30, read=0.3),
                   headers={**auth_headers, "X-Feature": feature},
                   json={"prompt": "a long story", "max_tokens": 480, "ignore_eos": True})
    deadline = time.monotonic() + 10
    while not (records := [x for x in _usage_records(server_dir) if x["feature"] == feature]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert records[0]["finish_reason"] == "abort"
    assert server.wait_idle()["vllm:kv_cache_usage_perc"] == 0.0


def test_idle_stats_lines_are_suppressed(server, auth_headers):
    """Stats are logged every second while busy, once more when the engine turns idle, then not while idle."""
    r = httpx.post(server.base_url + "/completions", headers=auth_headers, json={"prompt": "idle", "max_tokens": 2})
    assert r.status_code == 200
    server.wait_idle()
    time.sleep(2.5)  # the line saying it went idle is out
    count = server.log().count("Avg prompt throughput")
    time.sleep(3)
    assert server.log().count("Avg prompt throughput") == count
