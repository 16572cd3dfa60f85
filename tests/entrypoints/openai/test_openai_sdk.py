"""The official openai SDK against the real server: greedy outputs equal the offline API's."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME
from tokenmill import SamplingParams

pytestmark = pytest.mark.slow  # starts tokenmill serve processes

PROMPTS = ["Paged attention stores keys", "The quick brown fox", "def main():\n    print("]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Continuous batching?"}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def async_client(server) -> openai.AsyncOpenAI:
    """A new client per event loop (an httpx pool belongs to the loop that opened it)."""
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


async def stream_completion(client: openai.AsyncOpenAI, **kwargs) -> tuple[str, str | None]:
    """A greedy streamed completion's text and finish reason."""
    stream = await client.completions.create(model=MODEL_NAME, temperature=0, stream=True, **kwargs)
    text, finish = "", None
    async for chunk in stream:
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


@pytest.fixture(scope="module")
def expected(offline_llm) -> dict:
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return {
        "completions": [o.outputs[0].text for o in offline_llm.generate(PROMPTS, greedy, use_tqdm=False)],
        "chat": offline_llm.chat(CHAT, greedy, use_tqdm=False)[0].outputs[0].text,
    }


def test_completions_sync(client, expected):
    for prompt, text in zip(PROMPTS, expected["completions"]):
        r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == text
        assert r.model == MODEL_NAME and r.object == "text_completion"
        assert r.usage.completion_tokens <= MAX_TOKENS and r.usage.prompt_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_completions_sync_stream_with_usage(client, expected):
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["completions"][0]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_batched_prompts_and_n(client, expected):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(2 * len(PROMPTS)))
    assert [c.text for c in r.choices] == [t for t in expected["completions"] for _ in range(2)]


def test_chat_sync_and_stream(client, expected):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_completion_tokens=MAX_TOKENS,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected["chat"]
    stream = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["chat"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for position in content:
        assert len(position.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert position.logprob == pytest.approx(position.top_logprobs[0].logprob)
        assert position.logprob <= 0


def test_completion_logprobs_and_seed(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=5, logprobs=2, temperature=1.0,
                                  seed=123)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    again = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=5, temperature=1.0, seed=123)
    assert again.choices[0].text == r.choices[0].text


def test_vllm_extra_params(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=6, temperature=0.8, seed=1,
                                  extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.1,
                                              "min_tokens": 6, "ignore_eos": True, "stop_token_ids": [0]})
    assert r.usage.completion_tokens == 6
    assert r.choices[0].finish_reason == "length"


def test_stop_string(client, expected):
    full = expected["completions"][0]
    stop = full[3:5]
    if not stop.strip():
        pytest.skip("the tiny model's output has no usable stop string here")
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                  stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_models_endpoint(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_32_concurrent_streams_async(server, offline_llm):
    prompts = [f"User {i} asks: {PROMPTS[i % len(PROMPTS)]}" for i in range(32)]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline_llm.generate(prompts, greedy, use_tqdm=False)]

    async def run_all():
        async with async_client(server) as client:
            return await asyncio.wait_for(asyncio.gather(*(
                stream_completion(client, prompt=p, max_tokens=24, extra_body={"ignore_eos": True})
                for p in prompts)), timeout=120)

    results = asyncio.run(run_all())
    assert [finish for _, finish in results] == ["length"] * 32
    assert [text for text, _ in results] == expected


def test_async_chat_non_stream_and_stream(server, expected):
    async def run():
        async with async_client(server) as client:
            whole = await client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=MAX_TOKENS,
                                                         temperature=0)
            stream = await client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=MAX_TOKENS,
                                                          temperature=0, stream=True)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
            return whole, streamed

    whole, streamed = asyncio.run(run())
    assert whole.choices[0].message.content == streamed == expected["chat"]


def test_tokenize_detokenize(server, auth_headers, offline_llm):
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[0]}, headers=auth_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == offline_llm.get_tokenizer().encode(PROMPTS[0]) and body["count"] == len(body["tokens"])
    r = httpx.post(server.url + "/detokenize", json={"tokens": body["tokens"]}, headers=auth_headers)
    assert r.json() == {"prompt": PROMPTS[0]}
    r = httpx.post(server.url + "/tokenize", json={"messages": CHAT}, headers=auth_headers)
    assert r.status_code == 200 and r.json()["count"] > 0


def test_async_scheduling_server_streams_equal_offline(server_model_dir, tmp_path, offline_llm):
    """`serve --async-scheduling`: concurrent streams, stop strings and max_tokens give the offline texts."""
    from tests.entrypoints.openai.conftest import MAX_MODEL_LEN, ServerProcess

    prompts = [f"Request {i}: {PROMPTS[i % len(PROMPTS)]}" for i in range(16)]
    lengths = [5 + i for i in range(16)]
    stop = offline_llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    stop_text = stop[0].outputs[0].text[6:8]
    params = [SamplingParams(temperature=0, max_tokens=n, stop=[stop_text] if i % 4 == 0 else None)
              for i, n in enumerate(lengths)]
    expected = [(o.outputs[0].text, o.outputs[0].finish_reason)
                for o in offline_llm.generate(prompts, params, use_tqdm=False)]
    assert ("stop" in {f for _, f in expected}) and ("length" in {f for _, f in expected})

    proc = ServerProcess([str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "16MiB",
                          "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", MODEL_NAME,
                          "--api-key", API_KEY, "--async-scheduling"], tmp_path / "server.log")
    try:
        proc.wait_ready()

        async def run_all():
            async with async_client(proc) as client:
                return await asyncio.wait_for(asyncio.gather(*(
                    stream_completion(client, prompt=prompts[i], max_tokens=lengths[i],
                                      stop=[stop_text] if i % 4 == 0 else None)
                    for i in range(16))), timeout=120)

        assert asyncio.run(run_all()) == expected
        assert proc.wait_idle()["vllm:num_requests_running"] == 0
    finally:
        proc.stop()
