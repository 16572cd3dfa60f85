"""/v1/embeddings through a real `tokenmill serve`, with the openai SDK; vectors against transformers."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F

from tests.entrypoints.openai.conftest import (
    API_KEY,
    LIMITS_MAX_PROMPTS,
    LIMITS_MAX_QUEUE_LEN,
    MAX_MODEL_LEN,
    MODEL_NAME,
    HealthProbe,
    ServerProcess,
    assert_openai_error,
    queue_burst,
)
from tokenmill import SamplingParams

TEXTS = ["Paged attention stores keys", "The quick brown fox jumps over the lazy dog. " * 6]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(server_model_dir):
    """(token ids of a text, pooled and normalized final hidden states) from transformers."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(server_model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(server_model_dir)

    def embed(value: str | list[int], pooling_type: str = "LAST") -> np.ndarray:
        ids = tokenizer(value)["input_ids"] if isinstance(value, str) else value
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        pooled = hidden[-1] if pooling_type == "LAST" else hidden.mean(dim=0)
        return F.normalize(pooled, dim=-1).numpy()

    embed.num_tokens = lambda text: len(tokenizer(text)["input_ids"])
    return embed


def assert_vectors(data, expected: list[np.ndarray]) -> None:
    assert [d.index for d in data] == list(range(len(expected)))
    for d, want in zip(data, expected, strict=True):
        got = np.asarray(d.embedding, dtype=np.float32)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
        assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-5)


def test_string_and_list_inputs(client, reference):
    r = client.embeddings.create(model=MODEL_NAME, input=TEXTS[0], encoding_format="float")
    assert r.object == "list" and r.model == MODEL_NAME and r.data[0].object == "embedding"
    assert_vectors(r.data, [reference(TEXTS[0])])
    assert r.usage.prompt_tokens == r.usage.total_tokens == reference.num_tokens(TEXTS[0])
    r = client.embeddings.create(model=MODEL_NAME, input=TEXTS, encoding_format="float")
    assert_vectors(r.data, [reference(t) for t in TEXTS])
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(reference.num_tokens, TEXTS))


def test_token_id_inputs(client, reference):
    ids = [[5, 17, 42, 99, 7], list(range(10, 80))]
    r = client.embeddings.create(model=MODEL_NAME, input=ids[0], encoding_format="float")
    assert_vectors(r.data, [reference(ids[0])])
    r = client.embeddings.create(model=MODEL_NAME, input=ids, encoding_format="float")
    assert_vectors(r.data, [reference(i) for i in ids])
    assert r.usage.prompt_tokens == 75


def test_base64_equals_float(client, server, auth_headers):
    floats = client.embeddings.create(model=MODEL_NAME, input=TEXTS, encoding_format="float")
    # The SDK asks for base64 by default and decodes it.
    decoded = client.embeddings.create(model=MODEL_NAME, input=TEXTS)
    for a, b in zip(floats.data, decoded.data, strict=True):
        assert list(np.asarray(a.embedding, dtype=np.float32)) == list(np.asarray(b.embedding, dtype=np.float32))
    raw = httpx.post(server.base_url + "/embeddings", headers=auth_headers, timeout=30,
                     json={"input": TEXTS, "encoding_format": "base64"}).json()
    for item, want in zip(raw["data"], floats.data, strict=True):
        assert isinstance(item["embedding"], str)
        vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(vector, np.asarray(want.embedding, dtype=np.float32))


def test_embeddings_beside_a_running_generation(client, server, offline_llm, reference):
    """A pooling request joins the batch of a generation in flight; both come out as they would alone."""
    prompt = "Generation keeps going while embeddings are computed"
    expected = offline_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                                    use_tqdm=False)[0].outputs[0].text
    result = {}

    def generate():
        stream = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=40, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        result["text"] = "".join(chunk.choices[0].text for chunk in stream)

    thread = threading.Thread(target=generate)
    thread.start()
    try:
        time.sleep(0.2)
        vectors = [client.embeddings.create(model=MODEL_NAME, input=TEXTS, encoding_format="float")
                   for _ in range(3)]
    finally:
        thread.join(60)
    for r in vectors:
        assert_vectors(r.data, [reference(t) for t in TEXTS])
    assert result["text"] == expected
    assert server.wait_idle()["vllm:num_requests_running"] == 0


def test_feature_metering(client, server, server_dir):
    feature = f"embed-{uuid.uuid4().hex[:8]}"
    r = client.embeddings.create(model=MODEL_NAME, input=TEXTS, extra_headers={"X-Feature": feature})
    server.wait_idle()
    path = server_dir / "usage.jsonl"
    deadline = time.monotonic() + 5
    while len(records := [x for x in map(json.loads, path.read_text().splitlines())
                          if x["feature"] == feature]) < 2:
        assert time.monotonic() < deadline, records
        time.sleep(0.05)
    assert sum(x["input_tokens"] for x in records) == r.usage.prompt_tokens
    assert all(x["output_tokens"] == 0 and x["gpu_seconds"] > 0 for x in records)


@pytest.mark.parametrize(("body", "param", "code", "words"), [
    ({"input": "hi", "dimensions": 8}, "dimensions", None, "dimensions is not supported"),
    ({"input": ""}, "input", None, "empty"),
    ({"input": []}, "input", None, "empty"),
    ({"input": ["a", ""]}, "input", None, "empty"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", None, "float"),
    ({"input": "word " * (MAX_MODEL_LEN + 10)}, "input", "context_length_exceeded", "maximum context length"),
    ({"input": ["ok", [1] * 3, "x"]}, "input", None, "a list of strings, a list of token ids"),
    ({"input": 5}, "input", None, "a list of strings, a list of token ids"),
    ({"input": ["ok", "word " * (MAX_MODEL_LEN + 10)]}, "input[1]", "context_length_exceeded", "input[1]"),
    ({"input": [5, 10**6]}, "input", None, "vocabulary"),
    ({"input": "hi", "model": "nope"}, "model", "model_not_found", "does not exist"),
    ({"input": "hi", "truncate_prompt_tokens": 4}, "truncate_prompt_tokens", None, "Unrecognized"),
    ({"input": "ab\ud800cd"}, "input", None, "input holds a lone UTF-16 surrogate"),
    ({"input": ["ok", "\udc00"]}, "input", None, "input[1] holds a lone UTF-16 surrogate"),
])
def test_bad_requests(server, auth_headers, body, param, code, words):
    # ASCII JSON: a lone surrogate travels as its \ud800 escape, as JSON allows.
    response = httpx.post(server.base_url + "/embeddings", content=json.dumps(body).encode("ascii"), timeout=30,
                          headers={**auth_headers, "Content-Type": "application/json"})
    error = assert_openai_error(response)
    assert error["param"] == param and error["code"] == (code or error["code"]), error
    assert words in error["message"], error


@pytest.mark.slow
def test_mean_pooling_server(server_model_dir, tmp_path, reference):
    proc = ServerProcess([str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "16MiB",
                          "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", MODEL_NAME,
                          "--pooling-type", "mean", "--max-num-batched-tokens", "32"], tmp_path / "server.log")
    try:
        proc.wait_ready()
        client = openai.OpenAI(base_url=proc.base_url, api_key="unused", max_retries=0, timeout=60)
        r = client.embeddings.create(model=MODEL_NAME, input=TEXTS)
        assert_vectors(r.data, [reference(t, "MEAN") for t in TEXTS])
        ids = [list(range(10, 80)), [5, 6, 7]]
        r = client.embeddings.create(model=MODEL_NAME, input=ids)
        assert_vectors(r.data, [reference(i, "MEAN") for i in ids])
    finally:
        proc.stop()


def test_openapi_schema(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/embeddings" in schema["paths"] and "/v1/responses" in schema["paths"]
    embedding = schema["components"]["schemas"]["EmbeddingRequest"]
    assert embedding["additionalProperties"] is False
    assert {"input", "encoding_format", "dimensions"} <= set(embedding["properties"])
    responses = schema["components"]["schemas"]["ResponsesRequest"]["properties"]
    assert {"input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "metadata"} <= set(
        responses)


def test_long_input_is_refused_before_tokenization(server, auth_headers):
    """~0.9 MB of text is more than max_model_len tokens can hold: refused at once, /health never stalls."""
    body = json.dumps({"input": ["ok", "x" * 900_000]}).encode()
    with HealthProbe(server.url) as probe:
        for _ in range(3):
            r = httpx.post(server.base_url + "/embeddings", content=body, timeout=60,
                           headers={**auth_headers, "Content-Type": "application/json"})
            error = assert_openai_error(r, 400)
            assert error["code"] == "context_length_exceeded" and error["param"] == "input[1]", error
    assert max(probe.latencies) < 0.1, sorted(probe.latencies)[-5:]


@pytest.mark.slow  # starts its own server (limits_server)
def test_input_count_follows_max_prompts_per_request(limits_server):
    url = limits_server.base_url + "/embeddings"
    r = httpx.post(url, json={"input": ["a"] * (LIMITS_MAX_PROMPTS + 1)}, timeout=30)
    error = assert_openai_error(r, 400)
    assert error["param"] == "input" and "--max-prompts-per-request" in error["message"], error
    r = httpx.post(url, json={"input": [[1, 2]] * (LIMITS_MAX_PROMPTS + 1)}, timeout=30)
    assert assert_openai_error(r, 400)["param"] == "input"
    r = httpx.post(url, json={"input": ["a"] * LIMITS_MAX_PROMPTS}, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"]) == LIMITS_MAX_PROMPTS, r.text


@pytest.mark.slow  # starts its own server (limits_server)
def test_queue_limit_holds_under_a_burst(limits_server):
    """While a long generation holds the one batch slot, 10 simultaneous requests of 2 inputs each: each input
    takes a waiting-queue slot, so at most 2 requests (4 slots, --max-queue-len) are admitted.

    The tiny model can finish its 500 tokens before the burst is over (the engine runs in its own process);
    then slots free up and the premise is gone, so such an attempt is run again."""
    inputs_per_request = 2
    for _attempt in range(3):
        with httpx.stream("POST", limits_server.base_url + "/completions", timeout=60, json={
                "prompt": "hold", "max_tokens": 500, "ignore_eos": True, "stream": True}) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            next(lines)  # it runs
            finished_at: list[float] = []  # when the held generation's stream ended

            def read_to_the_end(lines=lines, finished_at=finished_at) -> None:
                for _ in lines:
                    pass
                finished_at.append(time.monotonic())

            reader = threading.Thread(target=read_to_the_end, daemon=True)
            reader.start()
            times: dict[str, float] = {}
            admitted, max_waiting = queue_burst(limits_server, limits_server.base_url + "/embeddings",
                                                {"input": ["burst"] * inputs_per_request}, 10, times)
            reader.join(60)
        assert max_waiting <= LIMITS_MAX_QUEUE_LEN, max_waiting
        limits_server.wait_idle(30)
        # The premise: the generation held the slot until every request of the burst had arrived and been
        # answered or queued (all are sent at "start"; refusals come back within ~0.1 s on loopback).
        if finished_at and finished_at[0] > max(times["start"] + 0.25, times.get("last_refusal", 0.0) + 0.1):
            break
    else:
        pytest.fail(f"the held generation ended before the burst did in every attempt: {finished_at} {times}")
    assert 1 <= admitted <= LIMITS_MAX_QUEUE_LEN // inputs_per_request, admitted
