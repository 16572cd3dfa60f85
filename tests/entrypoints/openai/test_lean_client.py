"""The serving benchmark's lean streaming client reads the real server's events as the openai SDK does."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from benchmarks.serving_overhead import _LeanConnection
from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME

pytestmark = pytest.mark.slow  # drives a tokenmill serve process


def test_lean_client_streams_the_same_completions_as_the_sdk(server):
    host, port = server.base_url.removeprefix("http://").removesuffix("/v1").split(":")
    body = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 9, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}

    async def two_requests() -> list[list[str]]:
        connection = _LeanConnection(host, int(port), {"Authorization": f"Bearer {API_KEY}"})
        try:  # twice on one keep-alive connection
            return [[e async for e in connection.post_events("/v1/completions", body)] for _ in range(2)]
        finally:
            await connection.close()

    runs = asyncio.run(two_requests())
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)
    expected = "".join(chunk.choices[0].text for chunk in client.completions.create(**{**body, "stream": True})
                       if chunk.choices)
    for events in runs:
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected
        assert chunks[-1]["usage"]["completion_tokens"] == 9
