"""Pydantic models of POST /v1/responses, OpenAI's Responses API, as far as a text model serves it.

Text or message input, instructions, sampling, max_output_tokens, metadata, streaming with the API's
semantic events, structured output (text.format json_object / json_schema) and function tools (tool_choice,
function_call output items, function_call / function_call_output input items) are supported. Built-in tools,
reasoning, stored responses (store, previous_response_id, conversation, background) and non-text content are
declared where OpenAI has them and refused with a 400 that names the parameter, unless left at a neutral value.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from tokenmill.entrypoints.openai.protocol import (
    Metadata,
    Penalty,
    RequestModel,
    ResponseModel,
    ToolName,
    VllmSamplingExtras,
    _not_supported,
    check_text,
)

_ROLES = ("user", "system", "developer", "assistant")
_ITEM_HINTS = {
    "reasoning": "reasoning items are not supported",
    "item_reference": "stored items cannot be referenced: responses are not stored",
}


# ---- request ---------------------------------------------------------------------------------------------------
class ResponseInputTextPart(RequestModel):
    """A text content part: input_text, or output_text replayed from an earlier response's output."""

    type: Literal["input_text", "output_text"]
    text: str
    # Carried by output_text parts copied from an earlier response; not used.
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value):
        if isinstance(value, dict) and value.get("type") not in ("input_text", "output_text"):
            raise ValueError(
                f"content part type {value.get('type')!r} is not supported: tokenmill serves text models; send "
                "{'type': 'input_text', 'text': ...} parts or a string"
            )
        if isinstance(value, dict) and not isinstance(value.get("text"), str):
            raise ValueError(f"an {value.get('type')} part needs 'text' (a string)")
        if isinstance(value, dict):
            check_text(value["text"], "text")
        return value


class ResponseInputMessage(RequestModel):
    """A message of the conversation (EasyInputMessage, or a message item with type 'message')."""

    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ResponseInputTextPart]
    # Present on items copied from an earlier response's output; not used.
    id: str | None = None
    status: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _messages_only(cls, value):
        if isinstance(value, dict) and value.get("type", "message") != "message":
            kind = value.get("type")
            hint = _ITEM_HINTS.get(str(kind), "only messages are supported")
            raise ValueError(f"input item type {kind!r} is not supported by tokenmill: {hint}")
        if isinstance(value, dict) and value.get("role") not in _ROLES:
            raise ValueError(f"message role {value.get('role')!r} is not supported: use one of "
                             f"{', '.join(_ROLES)} (a tool's result is a function_call_output item)")
        if isinstance(value, dict) and not isinstance(value.get("content"), str | list):
            raise ValueError("a message needs content: a string or a list of input_text parts")
        return value

    @field_validator("content")
    @classmethod
    def _content(cls, value):
        return check_text(value, "content") if isinstance(value, str) else value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFunctionCallItem(RequestModel):
    """A call from an earlier response's output, replayed in the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class ResponseFunctionCallOutputItem(RequestModel):
    """The result of a call (call_id), for the model to read."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None

    @field_validator("output")
    @classmethod
    def _output(cls, value):
        return check_text(value, "output")


# Tags of the input item kinds; they appear in validation error locations, which leave them out.
INPUT_MESSAGE, INPUT_FUNCTION_CALL, INPUT_FUNCTION_CALL_OUTPUT = (
    "input-message", "input-function-call", "input-function-call-output")
INPUT_ITEM_TAGS = (INPUT_MESSAGE, INPUT_FUNCTION_CALL, INPUT_FUNCTION_CALL_OUTPUT)


def _input_item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None) or "message"
    return {"function_call": INPUT_FUNCTION_CALL, "function_call_output": INPUT_FUNCTION_CALL_OUTPUT}.get(
        kind, INPUT_MESSAGE)


ResponseInputItem = Annotated[
    Annotated[ResponseInputMessage, Tag(INPUT_MESSAGE)]
    | Annotated[ResponseFunctionCallItem, Tag(INPUT_FUNCTION_CALL)]
    | Annotated[ResponseFunctionCallOutputItem, Tag(INPUT_FUNCTION_CALL_OUTPUT)],
    Discriminator(_input_item_kind),
]


class ResponseTextFormat(RequestModel):
    """text.format: "text", "json_object", or "json_schema" with name, schema (and strict, description)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    def response_format(self) -> dict[str, Any]:
        """The same constraint in /v1/chat/completions' response_format shape."""
        if self.type != "json_schema":
            return {"type": self.type}
        spec: dict[str, Any] = {"name": self.name, "schema": self.schema_}
        if self.strict is not None:
            spec["strict"] = self.strict
        return {"type": "json_schema", "json_schema": spec}


class ResponseFunctionTool(RequestModel):
    type: Literal["function"]
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, value):
        if isinstance(value, dict) and value.get("type") != "function":
            raise ValueError(f"tool type {value.get('type')!r} is not supported by tokenmill: only function tools "
                             "(there are no built-in tools)")
        return value


class ResponseNamedToolChoice(RequestModel):
    type: Literal["function"]
    name: ToolName


class ResponseTextConfig(RequestModel):
    format: ResponseTextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @field_validator("verbosity")
    @classmethod
    def _verbosity(cls, value):
        return _not_supported("text.verbosity", value, ("medium",), "remove it")


class ResponsesRequest(VllmSamplingExtras):
    model: str | None = Field(None, description="A served model name; omitted: the server's model.")
    input: str | list[ResponseInputItem] = Field(
        description="Text (one user message), or a list of items: messages with roles user, system, developer "
                    "or assistant and content as a string or input_text parts; function_call items of earlier "
                    "responses and function_call_output items with their results."
    )
    instructions: str | None = Field(None, description="A system message put before the input.")
    max_output_tokens: int | None = Field(None, ge=1, description="Most tokens to generate; cut: status incomplete.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy. Default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = False
    metadata: Metadata | None = Field(
        None, description="Free key/value pairs, echoed; metadata.feature tags the request for rate limits and cost "
                          "metering."
    )
    user: str | None = Field(None, description="An end-user id; accepted and not used.")
    safety_identifier: str | None = Field(None, description="An end-user id; accepted and not used.")
    text: ResponseTextConfig | None = Field(
        None, description="format: {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'name', "
                          "'schema', 'strict'}: the output is constrained to JSON (to the schema).")
    store: bool | None = Field(None, description="Only false: responses are not stored.")
    truncation: Literal["auto", "disabled"] | None = Field(None, description="Only 'disabled'.")
    tools: list[ResponseFunctionTool] | None = Field(
        None, description="Function tools ({'type': 'function', 'name', 'parameters', ...}); see tool_choice.")
    tool_choice: Literal["none", "auto", "required"] | ResponseNamedToolChoice | None = Field(
        None, description="As on /v1/chat/completions: 'auto' needs --enable-auto-tool-choice and "
                          "--tool-call-parser; 'required' and {'type': 'function', 'name'} are constrained.")
    parallel_tool_calls: bool | None = None
    max_tool_calls: Any = Field(None, description="Not supported.")
    previous_response_id: Any = Field(None, description="Not supported: responses are not stored.")
    conversation: Any = Field(None, description="Not supported: conversations are not stored.")
    background: bool | None = Field(None, description="Only false.")
    reasoning: Any = Field(None, description="Not supported (rejected unless null or {}).")
    include: Any = Field(None, description="Not supported (rejected unless null or []).")
    top_logprobs: Any = Field(None, description="Not supported (rejected unless null or 0).")
    stream_options: Any = Field(None, description="Not supported (rejected unless null or {}).")
    prompt: Any = Field(None, description="Not supported: there are no stored prompt templates.")
    prompt_cache_key: Any = Field(None, description="Not supported: prefix caching is automatic.")
    service_tier: Any = Field(None, description="Only 'auto' or 'default'.")
    # Sampling parameters beside OpenAI's (as on /v1/chat/completions); vLLM's extras come with the base class.
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = Field(None, description="vLLM extra: strings that end the output.")

    @field_validator("input")
    @classmethod
    def _input(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        return check_text(value, "input") if isinstance(value, str) else value

    @field_validator("instructions")
    @classmethod
    def _instructions(cls, value):
        return check_text(value, "instructions")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return value

    @field_validator("store")
    @classmethod
    def _store(cls, value):
        return _not_supported("store", value, (False,), "responses are not stored; send store=false or omit it")

    @field_validator("background")
    @classmethod
    def _background(cls, value):
        return _not_supported("background", value, (False,), "responses run in the foreground only")

    @field_validator("truncation")
    @classmethod
    def _truncation(cls, value):
        return _not_supported("truncation", value, ("disabled",),
                              "input is never truncated; shorten it to fit the context")

    @field_validator("include")
    @classmethod
    def _include(cls, value):
        return _not_supported("include", value, ([],), "remove it")

    @field_validator("reasoning", "stream_options")
    @classmethod
    def _empty_objects(cls, value, info):
        hint = "tokenmill runs no reasoning models" if info.field_name == "reasoning" else "remove it"
        return _not_supported(info.field_name, value, ({},), hint)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value):
        return _not_supported("top_logprobs", value, (0,), "use /v1/chat/completions with logprobs")

    @field_validator("previous_response_id", "conversation")
    @classmethod
    def _stored(cls, value, info):
        return _not_supported(info.field_name, value, (), "responses are not stored; send the whole conversation "
                              "in input")

    @field_validator("max_tool_calls", "prompt", "prompt_cache_key")
    @classmethod
    def _unsupported(cls, value, info):
        return _not_supported(info.field_name, value, (), "remove it")

    @field_validator("service_tier")
    @classmethod
    def _service_tier(cls, value):
        return _not_supported("service_tier", value, ("auto", "default"), "there is one tier")

    # The shared sampling-parameter builder reads these.
    @property
    def n(self) -> int:
        return 1

    @property
    def feature(self) -> str | None:
        return (self.metadata or {}).get("feature")

    @property
    def response_format(self) -> dict[str, Any] | None:
        """text.format as chat's response_format (what the shared structured-output reader takes)."""
        if self.text is None or self.text.format is None:
            return None
        return self.text.format.response_format()


# ---- response --------------------------------------------------------------------------------------------------
class ResponseOutputText(ResponseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ResponseOutputMessage(ResponseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[ResponseOutputText] = Field(default_factory=list)


class ResponseFunctionToolCall(ResponseModel):
    """A function call in a response's output; its result goes back as a function_call_output input item."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    # The arguments' JSON text (constrained to the tool's schema).
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


ResponseOutputItem = ResponseOutputMessage | ResponseFunctionToolCall


class ResponseInputTokensDetails(ResponseModel):
    cached_tokens: int = 0


class ResponseOutputTokensDetails(ResponseModel):
    reasoning_tokens: int = 0


class ResponseUsage(ResponseModel):
    input_tokens: int
    input_tokens_details: ResponseInputTokensDetails
    output_tokens: int
    output_tokens_details: ResponseOutputTokensDetails = Field(default_factory=ResponseOutputTokensDetails)
    total_tokens: int


class IncompleteDetails(ResponseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(ResponseModel):
    code: str
    message: str


class ResponsesResponse(ResponseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[ResponseOutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: Any = "auto"
    tools: list[Any] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["disabled"] = "disabled"
    metadata: dict[str, str] = Field(default_factory=dict)
    store: bool = False
    background: bool = False
    previous_response_id: None = None
    reasoning: None = None
    service_tier: Literal["default"] = "default"
    user: str | None = None
    usage: ResponseUsage | None = None

    @property
    def output_text(self) -> str:
        return "".join(part.text for item in self.output if isinstance(item, ResponseOutputMessage)
                       for part in item.content)


ResponseStreamEventType = Literal[
    "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
    "response.output_text.delta", "response.output_text.done", "response.content_part.done",
    "response.output_item.done", "response.completed", "response.incomplete", "error",
    "response.function_call_arguments.delta", "response.function_call_arguments.done",
]


class ResponseStreamEvent(ResponseModel):
    """One server-sent event of a streamed response (`event: <type>` then `data: {...}`). Which fields an event
    carries depends on its type, as in OpenAI's Responses API; an error after the stream started is an `error`
    event (code, message, param)."""

    type: ResponseStreamEventType
    sequence_number: int
    # response.created / in_progress / completed / incomplete: the whole response so far.
    response: ResponsesResponse | None = None
    output_index: int | None = None
    content_index: int | None = None
    item_id: str | None = None
    # response.output_item.added / done.
    item: ResponseOutputItem | None = None
    # response.content_part.added / done.
    part: ResponseOutputText | None = None
    # response.output_text.delta / function_call_arguments.delta: the new text or arguments;
    # response.output_text.done: all the text.
    delta: str | None = None
    text: str | None = None
    # response.function_call_arguments.done: the call's name and all its arguments.
    name: str | None = None
    arguments: str | None = None
    logprobs: list[Any] | None = None
    # error events.
    code: str | None = None
    message: str | None = None
    param: str | None = None
