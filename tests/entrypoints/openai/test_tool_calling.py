"""Tool calling through the real server and the official openai client: tool_choice required / named / auto
with the hermes parser, streaming equal to non-streaming, multi-turn history with tool results (rendered as
transformers renders it), LangChain's with_structured_output and bind_tools, and the 400s. The model is the tiny random-weight Llama with Hermes' tool tokens and
template, tweaked to write <tool_call> wherever it may (tool_models.py): its arguments are noise unless the
grammar holds them, so every valid call shows the constraint at work."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME, ServerProcess, assert_openai_error
from tests.entrypoints.openai.tool_models import build_tool_model

pytestmark = pytest.mark.slow  # drives tokenmill serve processes

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Oslo", "Lima", "Kyoto"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "units": {"type": "object", "properties": {"metric": {"type": "boolean"}}, "required": ["metric"]},
    },
    "required": ["city", "days", "units"],
}
SEARCH = {
    "type": "object",
    "properties": {"query": {"type": "string", "maxLength": 12}, "limit": {"type": "integer", "maximum": 5}},
    "required": ["query"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "search", "description": "Web search", "parameters": SEARCH}},
]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
USER = [{"role": "user", "content": "What is the weather in Oslo?"}]
TOOL_MODEL_NAME = "tokenmill-tests/tiny-tools"


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    return build_tool_model(tmp_path_factory.mktemp("tool_model") / "llama", eager=True)


@pytest.fixture(scope="module")
def tool_server(tool_model_dir, tmp_path_factory):
    proc = ServerProcess([
        str(tool_model_dir), "--dtype", "float32", "--kv-cache-memory", "16MiB", "--max-model-len", "2048",
        "--served-model-name", TOOL_MODEL_NAME, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    ], tmp_path_factory.mktemp("tool_server") / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(tool_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tool_server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(tool_server):
    with httpx.Client(base_url=tool_server.url, timeout=120) as c:
        yield c


def check_calls(message, names: set[str]) -> list:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({call.id for call in message.tool_calls}) == len(message.tool_calls)
    return message.tool_calls


def streamed_calls(chunks) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """(content, [(name, arguments)], finish_reason) reassembled from tool-call deltas."""
    content = None
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.delta.content:
                content = (content or "") + choice.delta.content
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:
                    assert delta.index not in calls and delta.type == "function"
                    calls[delta.index] = [delta.function.name, delta.function.arguments or ""]
                else:
                    calls[delta.index][1] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice, names", [
    ("required", {"get_weather", "search"}),
    ({"type": "function", "function": {"name": "search"}}, {"search"}),
], ids=["required", "named"])
def test_required_and_named_calls_validate_and_stream_equal(client, tool_choice, names):
    for seed in range(4):
        kwargs = dict(model=TOOL_MODEL_NAME, messages=USER, tools=TOOLS, tool_choice=tool_choice, temperature=1.0,
                      seed=seed, max_tokens=300, parallel_tool_calls=False)
        full = client.chat.completions.create(**kwargs)
        choice = full.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        calls = check_calls(choice.message, names)
        assert len(calls) == 1  # parallel_tool_calls=False
        content, streamed, finish = streamed_calls(client.chat.completions.create(stream=True, **kwargs))
        assert content is None and finish == "tool_calls"
        assert streamed == [(c.function.name, c.function.arguments) for c in calls]


def test_auto_mode_calls_the_model_opens_are_valid(client):
    # The model writes <tool_call> first (its tweak); everything after it is noise unless constrained.
    for seed in range(8):
        completion = client.chat.completions.create(
            model=TOOL_MODEL_NAME, messages=USER, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=300,
            parallel_tool_calls=False,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        check_calls(choice.message, {"get_weather", "search"})


def test_parallel_calls_stream_equal(client):
    kwargs = dict(model=TOOL_MODEL_NAME, messages=USER, tools=TOOLS, tool_choice="required", temperature=1.0,
                  seed=5, max_tokens=400, n=2)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    for choice in full.choices:
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        own = [c.model_copy(update={"choices": [x for x in c.choices if x.index == choice.index]}) for c in chunks]
        content, streamed, finish = streamed_calls(own)
        assert streamed == calls and finish == choice.finish_reason
        if choice.finish_reason == "tool_calls":
            check_calls(choice.message, {"get_weather", "search"})


def test_tool_choice_none_is_text(client):
    completion = client.chat.completions.create(model=TOOL_MODEL_NAME, messages=USER, tools=TOOLS,
                                                tool_choice="none", temperature=0.0, max_tokens=4)
    choice = completion.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "length"
    assert choice.message.content == "<tool_call>" * 4  # the model's free text, not parsed


def test_multi_turn_with_tool_results(client, tool_model_dir):
    first = client.chat.completions.create(model=TOOL_MODEL_NAME, messages=USER, tools=TOOLS,
                                           tool_choice="required", temperature=1.0, seed=1, max_tokens=300,
                                           parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    # The SDK's reply message object sent back as it is (the usual agent loop).
    resent = client.chat.completions.create(
        model=TOOL_MODEL_NAME, tools=TOOLS, tool_choice="none", max_tokens=1,
        messages=[*USER, first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "3"}])
    assert resent.choices[0].finish_reason == "length"
    messages = [
        {"role": "system", "content": "You are terse."},
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 3}'},
        {"role": "user", "content": "And tomorrow?"},
    ]
    second = client.chat.completions.create(model=TOOL_MODEL_NAME, messages=messages, tools=TOOLS,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            temperature=1.0, seed=2, max_tokens=300)
    check_calls(second.choices[0].message, {"get_weather"})
    # The prompt is what transformers renders for the same conversation (tools, the call, its result).
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tool_model_dir))
    reference = [dict(m) for m in messages]
    reference[2] = {"role": "assistant", "tool_calls": [{
        "id": call.id, "type": "function",
        "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)},
    }]}
    text = tokenizer.apply_chat_template(reference, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "<tool_response>\n{\"temperature\": 3}\n</tool_response>" in text
    assert call.function.name in text and '"name": "search"' in text
    assert second.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_sdk_parse_with_pydantic_tools(client):
    class Lookup(BaseModel):
        query: str = Field(max_length=8)
        limit: int = Field(ge=1, le=3)

    completion = client.chat.completions.parse(
        model=TOOL_MODEL_NAME, messages=USER, tools=[openai.pydantic_function_tool(Lookup)], tool_choice="required",
        temperature=1.0, seed=3, max_tokens=200,
    )
    call = completion.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, Lookup)


@pytest.mark.parametrize("body, param, text", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "tools[0].function.parameters", "not a valid JSON schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}},
     "tool_choice", "'missing', which is not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot apply as well"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "more than once"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}], "tool_choice": "required"},
     "tools[0].function.parameters", "not"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "pattern"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "a", "type": "function",
                                                                      "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages", "only assistant messages carry tool_calls"),
], ids=["bad-schema", "unknown-named", "required-no-tools", "named-no-tools", "with-response-format", "duplicate",
        "unenforceable", "bad-name", "user-tool-calls"])
def test_bad_tool_requests_are_400s_and_the_server_serves_on(http, body, param, text):
    r = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 8, **body})
    error = assert_openai_error(r, 400)
    assert error["param"] is not None and error["param"].startswith(param), error
    assert text in error["message"], error
    r = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
    assert r.status_code == 200, r.text


# ---- /v1/responses -----------------------------------------------------------------------------------------------
RESPONSES_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                    "parameters": t["function"]["parameters"]} for t in TOOLS]


def test_responses_function_calls_validate_and_stream_equal(client):
    for tool_choice in ("required", {"type": "function", "name": "get_weather"}, "auto"):
        kwargs = dict(model=TOOL_MODEL_NAME, input="Weather in Lima?", tools=RESPONSES_TOOLS, tool_choice=tool_choice,
                      temperature=1.0, extra_body={"seed": 4}, max_output_tokens=300,
                      parallel_tool_calls=False)
        response = client.responses.create(**kwargs)
        assert response.status == "completed"
        [call] = response.output
        assert call.type == "function_call" and call.call_id.startswith("call_") and call.id.startswith("fc_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        events = list(client.responses.create(stream=True, **kwargs))
        arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        [added] = [e for e in events if e.type == "response.output_item.added"]
        [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert added.item.name == call.name and arguments == done.arguments == call.arguments
        assert events[-1].type == "response.completed"
        assert events[-1].response.output[0].arguments == call.arguments


def test_responses_multi_turn_with_function_call_output(client):
    first = client.responses.create(model=TOOL_MODEL_NAME, input="Weather in Lima?", tools=RESPONSES_TOOLS,
                                    tool_choice="required", temperature=1.0, extra_body={"seed": 2}, max_output_tokens=300,
                                    parallel_tool_calls=False)
    call = first.output[0]
    conversation = [
        {"role": "user", "content": "Weather in Lima?"},
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'},
    ]
    second = client.responses.create(model=TOOL_MODEL_NAME, input=conversation, tools=RESPONSES_TOOLS,
                                     tool_choice={"type": "function", "name": "search"}, temperature=1.0, extra_body={"seed": 3},
                                     max_output_tokens=300)
    [call2] = second.output
    jsonschema.validate(json.loads(call2.arguments), SEARCH)
    # The same conversation on chat renders the same prompt.
    chat = client.chat.completions.create(
        model=TOOL_MODEL_NAME, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}},
        max_tokens=1, messages=[
            {"role": "user", "content": "Weather in Lima?"},
            {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function",
                                                  "function": {"name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": '{"temperature": 21}'},
        ])
    assert chat.usage.prompt_tokens == second.usage.input_tokens


def test_responses_text_format_json_schema(plain_client):
    response = plain_client.responses.create(
        model=MODEL_NAME, input="Forecast?", temperature=1.0, extra_body={"seed": 6}, max_output_tokens=200,
        text={"format": {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), WEATHER)
    assert response.text.format.type == "json_schema"
    parsed = plain_client.responses.parse(model=MODEL_NAME, input="Forecast?", temperature=1.0, extra_body={"seed": 6},
                                          max_output_tokens=200, text_format=Forecast)
    assert isinstance(parsed.output_parsed, Forecast)


# ---- LangChain ---------------------------------------------------------------------------------------------------
class Forecast(BaseModel):
    """A weather forecast."""

    city: Literal["Oslo", "Lima"]
    days: int = Field(ge=1, le=7)
    sunny: bool


@pytest.fixture(scope="module")
def chat(tool_server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=tool_server.base_url, api_key="unused", model=TOOL_MODEL_NAME, temperature=1.0,
                      max_tokens=200, max_retries=0, timeout=120)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_with_structured_output(chat, method):
    structured = chat.with_structured_output(Forecast, method=method)
    for seed in range(3):
        result = structured.bind(seed=seed).invoke("Forecast for Oslo?")
        assert isinstance(result, Forecast), result


def test_bind_tools_returns_tool_calls(chat):
    def get_weather(city: Literal["Oslo", "Lima", "Kyoto"], days: int) -> str:
        """Weather forecast for a city, for 1 to 7 days."""
        return "sunny"

    class Search(BaseModel):
        """Search the web."""

        query: str = Field(max_length=10)

    # tool_choice left to "auto": the model chooses (this one always opens a call), the call is constrained.
    model = chat.bind_tools([get_weather, Search], parallel_tool_calls=False)
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in model.kwargs["tools"]}
    for seed in range(3):
        message = model.bind(seed=seed).invoke("What is the weather in Lima?")
        assert message.tool_calls, message
        for call in message.tool_calls:
            assert call["name"] in ("get_weather", "Search") and call["id"]
            jsonschema.validate(call["args"], schemas[call["name"]])
        assert message.response_metadata["finish_reason"] == "tool_calls"


# ---- a server without a tool parser (the shared test server) ------------------------------------------------------
@pytest.fixture(scope="module")
def plain_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def test_auto_without_a_parser_is_a_400_naming_the_flags(server, auth_headers):
    for body in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "auto"}):
        r = httpx.post(server.base_url + "/chat/completions", headers=auth_headers, timeout=60,
                       json={"messages": USER, "max_tokens": 4, **body})
        error = assert_openai_error(r, 400)
        assert error["param"] == "tool_choice"
        assert "--enable-auto-tool-choice" in error["message"] and "--tool-call-parser" in error["message"]


def test_named_and_required_work_without_a_parser(plain_client):
    # Named: the output is the arguments object (as vLLM); required: llama3_json's plain-JSON calls.
    for tool_choice, names in (({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
                               ("required", {"get_weather", "search"})):
        kwargs = dict(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice=tool_choice, temperature=1.0,
                      seed=7, max_tokens=300, parallel_tool_calls=False)
        full = plain_client.chat.completions.create(**kwargs)
        choice = full.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = check_calls(choice.message, names)
        content, streamed, finish = streamed_calls(plain_client.chat.completions.create(stream=True, **kwargs))
        assert content is None and finish == "tool_calls"
        assert streamed == [(c.function.name, c.function.arguments) for c in calls]
