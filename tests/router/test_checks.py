"""Escalation checks and costs on plain responses (no processes)."""

from __future__ import annotations

import math

import pytest

from tokenmill.router.checks import run_checks
from tokenmill.router.config import CheckConfig, Price
from tokenmill.router.costs import Usage, cost_usd

CHAT = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "refund"}, "finish_reason": "stop",
                     "logprobs": {"content": [{"token": "re", "logprob": -0.5}, {"token": "fund", "logprob": -1.5}]}}]}
COMPLETION = {"choices": [{"index": 0, "text": '{"a": 1}', "finish_reason": "length",
                           "logprobs": {"token_logprobs": [-3.0, -1.0]}}]}


def test_checks():
    def fails(check: CheckConfig, response: dict, request: dict | None = None):
        return run_checks((check,), request or {}, response)

    assert fails(CheckConfig("choice", values=("refund", "cancel")), CHAT) is None
    failure = fails(CheckConfig("choice", values=("cancel",)), CHAT)
    assert failure.check == "choice" and failure.observed == "refund"
    assert fails(CheckConfig("regex", pattern="re.*"), CHAT) is None
    assert fails(CheckConfig("regex", pattern="x"), CHAT).observed == "refund"
    assert fails(CheckConfig("min_mean_logprob", value=-1.0), CHAT) is None
    failure = fails(CheckConfig("min_mean_logprob", value=-1.9), COMPLETION)
    assert failure.check == "min_mean_logprob" and failure.observed == pytest.approx(-2.0)
    assert fails(CheckConfig("not_truncated"), CHAT) is None
    assert fails(CheckConfig("not_truncated"), COMPLETION).observed == "length"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert fails(CheckConfig("json_schema", schema=schema), COMPLETION) is None
    assert fails(CheckConfig("json_schema"), CHAT).observed.startswith("not JSON")
    request = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "required": ["b"]}}}}
    assert "'b' is a required property" in fails(CheckConfig("json_schema"), COMPLETION, request).observed
    assert fails(CheckConfig("python", callable="tests.router.test_checks.short_answer"), CHAT) is None
    failure = fails(CheckConfig("python", callable="tests.router.test_checks.short_answer"), COMPLETION)
    assert failure.check == "python" and failure.observed == 8


def short_answer(request: dict, response: dict):
    """A custom eval for the python check: answers of at most 6 characters pass."""
    text = response["choices"][0].get("text") or response["choices"][0]["message"]["content"]
    return len(text) <= 6, len(text)


def test_costs():
    assert cost_usd(Price(input_per_1m=0.15, output_per_1m=0.60), Usage(1000, 500)) == pytest.approx(0.00045)
    assert cost_usd(Price(gpu_hourly=3.6), Usage(1000, 500, gpu_seconds=2.0)) == pytest.approx(0.002)
    assert cost_usd(Price(gpu_hourly=3.6), Usage(1000, 500)) is None
    usage = Usage.from_block({"prompt_tokens": 7, "completion_tokens": 3, "gpu_seconds": 0.25})
    assert (usage.input_tokens, usage.output_tokens, usage.gpu_seconds) == (7, 3, 0.25)
    assert not math.isnan(cost_usd(Price(), usage))
