"""/v1/responses through a real `tokenmill serve`, driven by the openai SDK's client.responses."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import openai
import pytest

from tests.entrypoints.openai.conftest import (
    API_KEY,
    LIMITS_MAX_QUEUE_LEN,
    MAX_MODEL_LEN,
    MAX_TOKENS_LIMIT,
    MODEL_NAME,
    assert_openai_error,
    queue_burst,
)
from tokenmill import SamplingParams
from tokenmill.entrypoints.openai.protocol_responses import ResponseStreamEvent

SYSTEM = "You are terse."
QUESTION = "What is continuous batching?"
MAX_TOKENS = 12
STREAM_EVENT_ORDER = [
    "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
]
STREAM_END_ORDER = [
    "response.output_text.done", "response.content_part.done", "response.output_item.done",
]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def chat_text(client, messages, **kwargs) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, **kwargs)


def test_text_input_equals_chat(client):
    r = client.responses.create(model=MODEL_NAME, input=QUESTION, max_output_tokens=MAX_TOKENS, temperature=0)
    chat = chat_text(client, [{"role": "user", "content": QUESTION}], max_tokens=MAX_TOKENS)
    assert r.object == "response" and r.model == MODEL_NAME and r.id.startswith("resp_")
    assert r.output_text == chat.choices[0].message.content and r.output_text
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens >= 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.max_output_tokens == MAX_TOKENS and r.temperature == 0


def test_messages_and_instructions_equal_chat(client):
    """instructions become the system message; content as a string or as input_text parts; assistant turns
    replayed with output_text parts (as agent code sends an earlier response's output back)."""
    r = client.responses.create(
        model=MODEL_NAME, instructions=SYSTEM, max_output_tokens=MAX_TOKENS, temperature=0,
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Hi. "}, {"type": "input_text", "text": "Go"}]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Hello.", "annotations": []}]},
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": QUESTION},
        ],
    )
    chat = chat_text(client, [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi. Go"},
        {"role": "assistant", "content": "Hello."}, {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": QUESTION},
    ], max_tokens=MAX_TOKENS)
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.instructions == SYSTEM


def test_max_output_tokens_cut_is_incomplete(client):
    r = client.responses.create(model=MODEL_NAME, input=QUESTION, max_output_tokens=5, temperature=0,
                                extra_body={"ignore_eos": True})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"
    assert r.usage.output_tokens == 5


def test_stop_is_completed(client, offline_llm):
    """A response that ends by itself (here on a stop token id, vLLM's extra) is completed."""
    prompt = offline_llm.get_tokenizer().apply_chat_template([{"role": "user", "content": QUESTION}],
                                                            add_generation_prompt=True)
    greedy = offline_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                  use_tqdm=False)[0].outputs[0].token_ids
    stop_id = greedy[3]
    r = client.responses.create(model=MODEL_NAME, input=QUESTION, max_output_tokens=30, temperature=0,
                                extra_body={"stop_token_ids": [stop_id]})
    assert r.status == "completed" and r.incomplete_details is None and r.output[0].status == "completed"
    assert r.usage.output_tokens == greedy.index(stop_id) + 1


def test_sampling_parameters_are_honoured(client):
    greedy = client.responses.create(model=MODEL_NAME, input=QUESTION, max_output_tokens=MAX_TOKENS,
                                     temperature=0).output_text
    # top_k=1 makes a sampled response greedy; the same seed gives the same draw.
    assert client.responses.create(model=MODEL_NAME, input=QUESTION, max_output_tokens=MAX_TOKENS, temperature=1.0,
                                   extra_body={"top_k": 1}).output_text == greedy
    seeded = [client.responses.create(model=MODEL_NAME, input=QUESTION, max_output_tokens=MAX_TOKENS,
                                      temperature=1.5, top_p=0.95, extra_body={"seed": 7}).output_text
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    draws = {client.responses.create(model=MODEL_NAME, input=QUESTION, max_output_tokens=MAX_TOKENS,
                                     temperature=1.5, extra_body={"seed": s}).output_text for s in range(4)}
    assert len(draws) > 1  # temperature reaches the sampler


def test_streaming_events(client):
    kwargs = dict(model=MODEL_NAME, instructions=SYSTEM, input=[{"role": "user", "content": QUESTION}],
                  max_output_tokens=MAX_TOKENS, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert types[:4] == STREAM_EVENT_ORDER
    num_deltas = types.count("response.output_text.delta")
    assert num_deltas >= 1 and types[4:4 + num_deltas] == ["response.output_text.delta"] * num_deltas
    assert types[4 + num_deltas:-1] == STREAM_END_ORDER
    assert types[-1] == ("response.completed" if whole.status == "completed" else "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[4 + num_deltas]
    assert deltas == done.text == whole.output_text
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert len(item_ids) == 1 and events[2].item.id in item_ids
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert final.output_text == whole.output_text and final.status == whole.status
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert events[-2].item.content[0].text == whole.output_text


def test_stream_wire_format(server):
    """Each event is framed as OpenAI frames it: `event: <type>` then `data: <json>` of the same type."""
    with httpx.stream("POST", server.base_url + "/responses", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"input": "hi", "max_output_tokens": 3, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        blocks = [b for b in r.read().decode().split("\n\n") if b]
    for block in blocks:
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        assert json.loads(data_line[6:])["type"] == event_line[7:]
        # Each event is what /openapi.json declares (ResponseStreamEvent, with its event types).
        ResponseStreamEvent.model_validate_json(data_line[6:])


def test_openapi_declares_the_stream(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    content = schema["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]
    sse = content["text/event-stream"]
    assert sse["schema"]["type"] == "string" and "$ref" not in sse["schema"]
    event = sse["x-sse-event"]
    assert event["properties"]["data"]["contentSchema"]["$ref"].endswith("/ResponseStreamEvent")
    assert {"response.created", "response.output_text.delta", "response.completed", "error"} <= set(
        event["properties"]["event"]["enum"])
    assert "ResponseStreamEvent" in schema["components"]["schemas"]
    assert "$ref" in content["application/json"]["schema"]


LONE = '"ab\\ud800cd"'  # JSON text: a string with a lone high surrogate
SURROGATE_CASES = [
    ("input-text", '{"input": LONE}', "input"),
    ("instructions", '{"input": "hi", "instructions": LONE}', "instructions"),
    ("message-content", '{"input": [{"role": "user", "content": LONE}]}', "input.[0].content"),
    ("content-part", '{"input": [{"role": "user", "content": [{"type": "input_text", "text": LONE}]}]}',
     "input.[0].content.[0]"),
]


@pytest.mark.parametrize("case", SURROGATE_CASES, ids=[c[0] for c in SURROGATE_CASES])
def test_lone_surrogate_is_400_naming_the_field(server, auth_headers, case):
    _, body, param = case
    r = httpx.post(server.base_url + "/responses", content=body.replace("LONE", LONE).encode("ascii"),
                   headers={**auth_headers, "Content-Type": "application/json"}, timeout=30)
    error = assert_openai_error(r, 400)
    assert error["param"] == param, error
    assert "surrogate" in error["message"], error


def test_long_input_is_context_length_exceeded(server, auth_headers):
    """Over max_model_len tokens, or more text than max_model_len tokens can hold (refused before it is
    tokenized): 400 context_length_exceeded naming input, as chat names messages."""
    for text in ("word " * MAX_MODEL_LEN, "x" * 900_000):
        for path, body, param in (("/responses", {"input": text, "max_output_tokens": 4}, "input"),
                                  ("/chat/completions", {"messages": [{"role": "user", "content": text}],
                                                         "max_tokens": 4}, "messages")):
            r = httpx.post(server.base_url + path, json=body, headers=auth_headers, timeout=60)
            error = assert_openai_error(r, 400)
            assert error["code"] == "context_length_exceeded" and error["param"] == param, (path, error)
            assert str(MAX_MODEL_LEN) in error["message"] and "shorten" in error["message"], error


@pytest.mark.slow  # starts its own server (limits_server)
def test_queue_limit_holds_under_a_burst(limits_server):
    """20 simultaneous response streams, one batch slot and --max-queue-len 4: at most 1 running + 4 waiting."""
    body = {"input": "burst", "max_output_tokens": 400, "ignore_eos": True, "stream": True}
    admitted, max_waiting = queue_burst(limits_server, limits_server.base_url + "/responses", body, 20)
    assert 1 <= admitted <= LIMITS_MAX_QUEUE_LEN + 1, admitted
    assert max_waiting <= LIMITS_MAX_QUEUE_LEN, max_waiting
    limits_server.wait_idle(30)


def test_metadata_feature_and_usage_log(client, server, server_dir):
    feature = f"resp-{uuid.uuid4().hex[:8]}"
    r = client.responses.create(model=MODEL_NAME, input=QUESTION, max_output_tokens=4, temperature=0,
                                metadata={"feature": feature, "ticket": "T-1"})
    assert r.metadata == {"feature": feature, "ticket": "T-1"}
    server.wait_idle()
    path = server_dir / "usage.jsonl"
    deadline = time.monotonic() + 5
    while not (records := [x for x in map(json.loads, path.read_text().splitlines()) if x["feature"] == feature]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [record] = records
    assert record["request_id"] == r.id
    assert record["input_tokens"] == r.usage.input_tokens and record["output_tokens"] == r.usage.output_tokens
    assert server.metrics()[f"tokenmill:feature_requests_total{{feature={feature}}}"] == 1


UNSUPPORTED = [
    ({"tools": [{"type": "web_search"}]}, "tools", "only function tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "name": "f"}]}, "tool_choice", "--enable-auto-tool-choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text.format",
     "not a valid JSON schema"),
    ({"text": {"format": {"type": "xml"}}}, "text.format", "json_object"),
    ({"previous_response_id": "resp_123"}, "previous_response_id", "not stored"),
    ({"conversation": "conv_1"}, "conversation", "not stored"),
    ({"store": True}, "store", "store=false"),
    ({"background": True}, "background", "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include", "include"),
    ({"truncation": "auto"}, "truncation", "truncat"),
    ({"top_logprobs": 3}, "top_logprobs", "top_logprobs"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "prompt"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input", "input_image"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input", "reasoning items are not supported"),
    ({"input": []}, "input", "empty"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input", "role 'tool' is not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input", "needs 'text'"),
    ({"n": 2}, "n", "Unrecognized request argument supplied: n"),
]


@pytest.mark.parametrize(("extra", "param", "words"), UNSUPPORTED, ids=[u[1] + "-" + u[2] for u in UNSUPPORTED])
def test_unsupported_parameters_are_refused_by_name(server, auth_headers, extra, param, words):
    body = {"model": MODEL_NAME, "input": "hi", **extra}
    error = assert_openai_error(httpx.post(server.base_url + "/responses", json=body, headers=auth_headers,
                                           timeout=30), 400)
    assert error["param"] is not None and error["param"].startswith(param), error
    assert words in error["message"], error


def test_limits(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL_NAME, input="hi", max_output_tokens=MAX_TOKENS_LIMIT + 1)
    assert e.value.body["param"] == "max_output_tokens" and e.value.body["code"] == "max_tokens_over_limit"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL_NAME, input="word " * MAX_MODEL_LEN, max_output_tokens=10)
    assert str(MAX_MODEL_LEN) in e.value.body["message"] and "shorten" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="hi")
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="sk-wrong").responses.create(model=MODEL_NAME, input="hi")


def test_closing_the_stream_aborts_the_request(client, server, server_dir):
    feature = f"resp-gone-{uuid.uuid4().hex[:8]}"
    stream = client.responses.create(model=MODEL_NAME, input=QUESTION, max_output_tokens=400, temperature=0,
                                     stream=True, metadata={"feature": feature}, extra_body={"ignore_eos": True})
    for event in stream:
        if event.type == "response.output_text.delta":
            break
    stream.close()
    server.wait_idle()
    path = server_dir / "usage.jsonl"
    deadline = time.monotonic() + 5
    while not (records := [x for x in map(json.loads, path.read_text().splitlines()) if x["feature"] == feature]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert records[0]["finish_reason"] == "abort" and records[0]["output_tokens"] < 400
