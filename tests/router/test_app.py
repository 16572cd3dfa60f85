"""`tokenmill route` in front of real `tokenmill serve` backends, driven by the openai SDK."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import openai
import pytest

from tests.entrypoints.openai.conftest import assert_openai_error
from tests.router.conftest import (
    CLOUD_KEY,
    CLOUD_MODEL,
    CLOUD_PRICE,
    GPU_HOURLY,
    LOCAL_MODEL,
    RouterProcess,
    backends_config,
)

# Four processes start for this module (~40 s on 2 shared cores): the full lane runs it.
pytestmark = pytest.mark.slow

USER_KEY = "sk-router-user"
LIMITED_KEY = "sk-router-limited"  # 2 requests per minute
TPM_KEY = "sk-router-tpm"  # 60 tokens per minute
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "You classify."}, {"role": "user", "content": "I want my money back"}]
GREEDY = {"temperature": 0.0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def router(local_replicas, cloud_server, cloud_env, router_dir):
    keys = router_dir / "router-keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "user", "key": USER_KEY},
                                         {"name": "limited", "key": LIMITED_KEY, "requests_per_minute": 2},
                                         {"name": "tpm", "key": TPM_KEY, "tokens_per_minute": 60}]}))
    config = {
        "backends": backends_config(local_replicas, cloud_server),
        "routes": [
            {"name": "classify", "match": {"feature": "classify-intent"}, "backend": "local-small", "max_tokens": 8,
             "escalate": {"to": "cloud-mid", "when": [{"check": "choice", "values": ["refund", "cancel", "other"]}]}},
            {"name": "confident", "match": {"feature": "confident"}, "backend": "local-small",
             "escalate": {"to": "cloud-mid", "when": [{"check": "regex", "pattern": "(?s).*"},
                                                      {"check": "min_mean_logprob", "value": -1.0e9}]}},
            {"name": "cloud", "match": {"feature": "cloud-only"}, "backend": "cloud-mid"},
            {"name": "short", "match": {"feature": "short-input"}, "backend": "local-small", "max_input_tokens": 5},
            {"name": "busy", "match": {"feature": "busy"}, "backend": "cloud-limited"},
            {"name": "busy-fallback", "match": {"feature": "busy-fallback"}, "backend": "cloud-limited",
             "fallback": ["local-small"]},
            {"name": "default", "match": {"model": "*"}, "backend": "local-small", "fallback": ["cloud-mid"],
             "max_tokens": 64},
        ],
        "api_keys_file": str(keys),
        "feature_rate_limits": {"tight": {"requests_per_minute": 1}},
        "usage_log": str(router_dir / "usage.jsonl"),
        "escalation_log": str(router_dir / "escalations.jsonl"),
        "health": {"interval_s": 0.5},
    }
    proc = RouterProcess(config, router_dir, "router", env=cloud_env)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.base_url, api_key=USER_KEY, max_retries=0)


@pytest.fixture(scope="module")
def direct(local_replicas) -> openai.OpenAI:
    return openai.OpenAI(base_url=local_replicas[0].base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def cloud_direct(cloud_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=cloud_server.base_url, api_key=CLOUD_KEY, max_retries=0)


# ---- equality with direct calls ------------------------------------------------------------------------------------
def test_sync_completion_and_chat_equal_direct(client, direct):
    for _ in range(2):  # both replicas of the pool answer at least once (balancing spreads an idle pool)
        routed = client.completions.create(model=LOCAL_MODEL, prompt=PROMPT, **GREEDY)
        assert routed.choices[0].text == direct.completions.create(model=LOCAL_MODEL, prompt=PROMPT, **GREEDY
                                                                    ).choices[0].text
    routed = client.chat.completions.create(model=LOCAL_MODEL, messages=MESSAGES, **GREEDY)
    expected = direct.chat.completions.create(model=LOCAL_MODEL, messages=MESSAGES, **GREEDY)
    assert routed.choices[0].message.content == expected.choices[0].message.content
    assert routed.usage.prompt_tokens == expected.usage.prompt_tokens
    assert routed.usage.completion_tokens == 8


def test_streaming_equal_direct(client, direct):
    pieces, usage = [], None
    for chunk in client.completions.create(model=LOCAL_MODEL, prompt=PROMPT, stream=True, **GREEDY):
        pieces.extend(c.text for c in chunk.choices)
        assert chunk.usage is None  # the router's own usage chunk is not passed on unless asked for
    expected = direct.completions.create(model=LOCAL_MODEL, prompt=PROMPT, **GREEDY).choices[0].text
    assert "".join(pieces) == expected
    chat_pieces = []
    for chunk in client.chat.completions.create(model=LOCAL_MODEL, messages=MESSAGES, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY):
        chat_pieces.extend(c.delta.content or "" for c in chunk.choices)
        if chunk.usage is not None:
            usage = chunk.usage
    expected = direct.chat.completions.create(model=LOCAL_MODEL, messages=MESSAGES, **GREEDY)
    assert "".join(chat_pieces) == expected.choices[0].message.content
    assert usage is not None and usage.completion_tokens == 8


def test_async_concurrent_equal_direct(router, direct):
    prompts = [f"{PROMPT} number {i}" for i in range(6)]
    expected = [direct.completions.create(model=LOCAL_MODEL, prompt=p, **GREEDY).choices[0].text for p in prompts]

    async def run():
        async with openai.AsyncOpenAI(base_url=router.base_url, api_key=USER_KEY, max_retries=0) as aclient:
            results = await asyncio.gather(*(aclient.completions.create(model=LOCAL_MODEL, prompt=p, **GREEDY)
                                             for p in prompts))
            chat = await aclient.chat.completions.create(model=LOCAL_MODEL, messages=MESSAGES, **GREEDY)
            return [r.choices[0].text for r in results], chat.choices[0].message.content

    texts, chat_text = asyncio.run(run())
    assert texts == expected
    assert chat_text == direct.chat.completions.create(model=LOCAL_MODEL, messages=MESSAGES, **GREEDY
                                                       ).choices[0].message.content


def test_usage_block_reports_gpu_seconds(direct):
    r = direct.completions.create(model=LOCAL_MODEL, prompt=PROMPT, **GREEDY)
    assert r.usage.model_extra["gpu_seconds"] > 0


# ---- routing -------------------------------------------------------------------------------------------------------
def test_feature_routing_and_default_route(client, cloud_direct):
    raw = client.completions.with_raw_response.create(model=LOCAL_MODEL, prompt=PROMPT,
                                                      extra_headers={"X-Feature": "cloud-only"}, **GREEDY)
    assert raw.headers["x-tokenmill-backend"] == "cloud-mid"
    assert raw.headers["x-tokenmill-route"] == "cloud"
    assert raw.parse().model == CLOUD_MODEL
    # metadata.feature selects the route too.
    raw = client.chat.completions.with_raw_response.create(model=LOCAL_MODEL, messages=MESSAGES,
                                                           metadata={"feature": "cloud-only"}, **GREEDY)
    assert raw.headers["x-tokenmill-backend"] == "cloud-mid"
    # An unknown feature and an unknown model both take the "*" route.
    for headers, model in (({"X-Feature": "no-such-feature"}, LOCAL_MODEL), ({}, "some-other-model")):
        raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, extra_headers=headers,
                                                          **GREEDY)
        assert raw.headers["x-tokenmill-route"] == "default"
        assert raw.headers["x-tokenmill-backend"] == "local-small"
        assert raw.parse().model == LOCAL_MODEL


def test_models_lists_route_models(client):
    assert [m.id for m in client.models.list().data] == [LOCAL_MODEL, CLOUD_MODEL]


def test_openapi_health_and_bad_feature(router):
    assert httpx.get(router.url + "/openapi.json").json()["paths"].keys() >= {"/v1/completions",
                                                                               "/v1/chat/completions"}
    health = router.health()
    assert health["status"] == "ok" and len(health["backends"]["local-small"]) == 2
    r = httpx.post(router.base_url + "/completions", json={"prompt": "x"},
                   headers={"Authorization": f"Bearer {USER_KEY}", "X-Feature": "bad feature!"})
    assert assert_openai_error(r, 400)["param"] == "X-Feature"
    r = httpx.post(router.base_url + "/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {USER_KEY}"})
    assert_openai_error(r, 400)


def test_busy_backend_fails_over_and_passes_retry_after(router, client):
    # The limited cloud key allows 1 request per minute: the first request uses it up.
    raw = client.completions.with_raw_response.create(model=LOCAL_MODEL, prompt=PROMPT, max_tokens=2,
                                                      extra_headers={"X-Feature": "busy"})
    assert raw.headers["x-tokenmill-backend"] == "cloud-limited"
    # Then the backend answers 429: with no other replica, the client gets 503 and the backend's Retry-After.
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=LOCAL_MODEL, prompt=PROMPT, max_tokens=2, extra_headers={"X-Feature": "busy"})
    assert e.value.status_code == 503 and e.value.body["code"] == "backends_busy"
    assert int(e.value.response.headers["retry-after"]) > 1
    # With a fallback, "busy" moves the request on, and the failover is counted.
    raw = client.completions.with_raw_response.create(model=LOCAL_MODEL, prompt=PROMPT, max_tokens=2,
                                                      extra_headers={"X-Feature": "busy-fallback"})
    assert raw.headers["x-tokenmill-backend"] == "local-small"
    metrics = router.metrics()
    assert metrics["tokenmill_router:failovers_total{backend=cloud-limited,reason=busy,route=busy-fallback}"] == 1
    assert metrics["tokenmill_router:failovers_total{backend=cloud-limited,reason=busy,route=busy}"] == 1
    # A busy replica is not ejected.
    assert all(r["healthy"] for r in router.health()["backends"]["cloud-limited"])


# ---- guardrails ----------------------------------------------------------------------------------------------------
def test_auth_401(router):
    bad = openai.OpenAI(base_url=router.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=LOCAL_MODEL, prompt=PROMPT, max_tokens=2)
    r = httpx.post(router.base_url + "/completions", json={"model": LOCAL_MODEL, "prompt": PROMPT})
    assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
    assert_openai_error(httpx.get(router.base_url + "/models"), 401)


def test_rate_limit_429_with_retry_after(router):
    limited = openai.OpenAI(base_url=router.base_url, api_key=LIMITED_KEY, max_retries=0)
    for _ in range(2):
        limited.completions.create(model=LOCAL_MODEL, prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
        limited.completions.create(model=LOCAL_MODEL, prompt=PROMPT, max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert "limited" in e.value.message
    # A feature's limit holds over all keys.
    client = openai.OpenAI(base_url=router.base_url, api_key=USER_KEY, max_retries=0)
    client.completions.create(model=LOCAL_MODEL, prompt=PROMPT, max_tokens=2, extra_headers={"X-Feature": "tight"})
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=LOCAL_MODEL, prompt=PROMPT, max_tokens=2,
                                  extra_headers={"X-Feature": "tight"})
    assert "feature 'tight'" in e.value.message and int(e.value.response.headers["retry-after"]) >= 1


def test_token_rate_limit_counts_the_prompt(router, direct):
    tpm = openai.OpenAI(base_url=router.base_url, api_key=TPM_KEY, max_retries=0)
    num_prompt = direct.completions.create(model=LOCAL_MODEL, prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    # prompt + max_tokens over the key's 60 tokens per minute: it can never fit (400, with the exact count).
    with pytest.raises(openai.BadRequestError) as e:
        tpm.completions.create(model=LOCAL_MODEL, prompt=PROMPT, max_tokens=61 - num_prompt)
    assert f"needs {61} tokens" in e.value.message
    # Exactly 60 fits once; the next request waits for the bucket to refill.
    tpm.completions.create(model=LOCAL_MODEL, prompt=PROMPT, max_tokens=60 - num_prompt,
                           extra_body={"ignore_eos": True})
    with pytest.raises(openai.RateLimitError) as e:
        tpm.completions.create(model=LOCAL_MODEL, prompt=PROMPT, max_tokens=2)
    assert "tokens per minute" in e.value.message and int(e.value.response.headers["retry-after"]) >= 1


def test_max_tokens_cap_and_max_input_tokens(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=LOCAL_MODEL, prompt=PROMPT, max_tokens=65)
    assert e.value.body["code"] == "max_tokens_over_limit" and "64" in e.value.message
    # A chat request without max_tokens gets the route's cap.
    r = client.chat.completions.create(model=LOCAL_MODEL, messages=MESSAGES, temperature=0.0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 64
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=LOCAL_MODEL, prompt=PROMPT + " and a much longer prompt than five tokens",
                                  max_tokens=2, extra_headers={"X-Feature": "short-input"})
    assert e.value.body["code"] == "input_too_long"


# ---- escalation ----------------------------------------------------------------------------------------------------
def _cloud_cost(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * CLOUD_PRICE["input_per_1m"] + output_tokens * CLOUD_PRICE["output_per_1m"]) / 1e6


def test_failing_check_escalates_every_request(router, client, cloud_direct, router_dir):
    log_path = router_dir / "escalations.jsonl"
    before = len(log_path.read_text().splitlines()) if log_path.exists() else 0
    expected = cloud_direct.chat.completions.create(model=CLOUD_MODEL, messages=MESSAGES, **GREEDY)
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model=LOCAL_MODEL, messages=MESSAGES, extra_headers={"X-Feature": "classify-intent"}, **GREEDY)
        assert raw.headers["x-tokenmill-backend"] == "cloud-mid"
        assert raw.headers["x-tokenmill-escalated"] == "true"
        assert raw.parse().choices[0].message.content == expected.choices[0].message.content
    # A streaming request on an escalating route: the escalated tier's answer, streamed.
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=LOCAL_MODEL, messages=MESSAGES, stream=True, extra_headers={"X-Feature": "classify-intent"}, **GREEDY)
        if c.choices]
    assert "".join(pieces) == expected.choices[0].message.content
    records = [json.loads(line) for line in log_path.read_text().splitlines()[before:]]
    assert len(records) == 3
    for record in records:
        assert set(record) == {"request_id", "time", "feature", "route", "cheap", "reason", "escalated",
                               "cost_delta_usd"}
        assert record["feature"] == "classify-intent" and record["route"] == "classify"
        assert record["request_id"].startswith("rtr-")
        cheap, strong = record["cheap"], record["escalated"]
        assert set(cheap) >= {"backend", "model", "input_tokens", "output_tokens", "latency_s", "cost_usd", "output"}
        assert set(strong) >= {"backend", "model", "input_tokens", "output_tokens", "latency_s", "cost_usd"}
        assert cheap["backend"] == "local-small" and cheap["model"] == LOCAL_MODEL
        assert strong["backend"] == "cloud-mid" and strong["model"] == CLOUD_MODEL
        assert record["reason"]["check"] == "choice" and record["reason"]["observed"] == cheap["output"]
        assert cheap["input_tokens"] == expected.usage.prompt_tokens and cheap["output_tokens"] == 8
        assert strong["input_tokens"] == expected.usage.prompt_tokens and strong["output_tokens"] == 8
        # gpu_hourly tier: the usage block's gpu_seconds x price; per-token tier: tokens x prices.
        assert cheap["gpu_seconds"] > 0
        assert cheap["cost_usd"] == pytest.approx(cheap["gpu_seconds"] * GPU_HOURLY / 3600)
        assert strong["cost_usd"] == pytest.approx(_cloud_cost(expected.usage.prompt_tokens, 8))
        assert record["cost_delta_usd"] == pytest.approx(strong["cost_usd"] - cheap["cost_usd"])
        assert strong["latency_s"] > 0 and cheap["latency_s"] > 0


def test_passing_check_escalates_nothing(router, client, direct, router_dir):
    log_path = router_dir / "escalations.jsonl"
    before = log_path.read_text() if log_path.exists() else ""
    expected = direct.chat.completions.create(model=LOCAL_MODEL, messages=MESSAGES, **GREEDY)
    for stream in (False, True):
        if stream:
            chunks = list(client.chat.completions.create(model=LOCAL_MODEL, messages=MESSAGES, stream=True,
                                                         extra_headers={"X-Feature": "confident"}, **GREEDY))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            raw = client.chat.completions.with_raw_response.create(
                model=LOCAL_MODEL, messages=MESSAGES, extra_headers={"X-Feature": "confident"}, **GREEDY)
            assert raw.headers["x-tokenmill-escalated"] == "false"
            assert raw.headers["x-tokenmill-backend"] == "local-small"
            response = raw.parse()
            # The router asked for logprobs for its check; the client did not, so it gets none.
            assert response.choices[0].logprobs is None
            text = response.choices[0].message.content
        assert text == expected.choices[0].message.content
    # Completions too: the router asks for logprobs=0 (the sampled tokens' logprobs) and strips them.
    raw = client.completions.with_raw_response.create(model=LOCAL_MODEL, prompt=PROMPT,
                                                      extra_headers={"X-Feature": "confident"}, **GREEDY)
    assert raw.headers["x-tokenmill-escalated"] == "false"
    assert raw.parse().choices[0].logprobs is None
    assert raw.parse().choices[0].text == direct.completions.create(model=LOCAL_MODEL, prompt=PROMPT, **GREEDY
                                                                     ).choices[0].text
    assert (log_path.read_text() if log_path.exists() else "") == before


def test_metrics_and_report_agree_with_logs(router, client, router_dir, tmp_path):
    # At least one escalation and one plain request are in the logs (whatever ran before).
    client.chat.completions.create(model=LOCAL_MODEL, messages=MESSAGES, extra_headers={"X-Feature":
                                   "classify-intent"}, **GREEDY)
    client.completions.create(model=LOCAL_MODEL, prompt=PROMPT, **GREEDY)
    usage = [json.loads(line) for line in (router_dir / "usage.jsonl").read_text().splitlines()]
    escalations = [json.loads(line) for line in (router_dir / "escalations.jsonl").read_text().splitlines()]
    metrics = router.metrics()
    # Escalations by route and reason.
    assert metrics["tokenmill_router:escalations_total{reason=choice,route=classify}"] == len(
        [e for e in escalations if e["route"] == "classify"])
    assert sum(1 for r in usage if r["escalated"]) == len(escalations)
    # Requests by route, backend, status.
    count = sum(1 for r in usage if r["route"] == "classify" and r["backend"] == "cloud-mid" and r["status"] == 200)
    assert metrics["tokenmill_router:requests_total{backend=cloud-mid,route=classify,status=200}"] == count
    # The report, from the logs.
    out = subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "route", "report",
                          str(router_dir / "usage.jsonl"), "--escalation-log", str(router_dir / "escalations.jsonl"),
                          "--json", "--plot", str(tmp_path / "report.png")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = {f["feature"]: f for f in json.loads(out.stdout)["features"]}
    assert (tmp_path / "report.png").stat().st_size > 0
    classify = report["classify-intent"]
    classify_usage = [r for r in usage if r["feature"] == "classify-intent"]
    assert classify["requests"] == len(classify_usage)
    assert classify["escalations"] == len([e for e in escalations if e["feature"] == "classify-intent"])
    assert classify["escalation_rate"] == 1.0
    assert classify["escalation_reasons"] == {"choice": classify["escalations"]}
    # Cost: the report's, the metrics' and the logs' (cheap + escalated attempts) agree.
    logged = sum(e["cheap"]["cost_usd"] + e["escalated"]["cost_usd"] for e in escalations
                 if e["feature"] == "classify-intent")
    assert classify["cost_usd"] == pytest.approx(logged)
    metric_cost = sum(v for k, v in metrics.items()
                      if k.startswith("tokenmill_router:cost_usd_total{") and "feature=classify-intent" in k)
    assert metric_cost == pytest.approx(classify["cost_usd"])
    # Everything escalated, so "all on the strong tier" costs the escalated attempts, and the cheap tries are lost.
    assert classify["strong_cost_usd"] == pytest.approx(sum(e["escalated"]["cost_usd"] for e in escalations
                                                            if e["feature"] == "classify-intent"))
    assert classify["saved_usd"] < 0
    for feature, values in report.items():
        # Features on routes without an escalation tier save nothing (and have no sample).
        assert metrics.get(f"tokenmill_router:saved_usd_total{{feature={feature}}}", 0.0) == pytest.approx(
            values["saved_usd"], abs=1e-12)
    # Savings on a passing route: cheap answers priced against the cloud's per-token price.
    confident = report.get("confident")
    if confident is not None:
        records = [r for r in usage if r["feature"] == "confident"]
        strong = sum(_cloud_cost(r["input_tokens"], r["output_tokens"]) for r in records)
        assert confident["strong_cost_usd"] == pytest.approx(strong)
        assert confident["saved_usd"] == pytest.approx(strong - confident["cost_usd"])
        assert confident["escalations"] == 0
    # The table form prints one line per feature and a total.
    table = subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "route", "report",
                            str(router_dir / "usage.jsonl")], capture_output=True, text=True, timeout=60).stdout
    assert "classify-intent" in table and "TOTAL" in table
