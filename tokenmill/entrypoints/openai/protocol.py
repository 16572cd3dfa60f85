"""Pydantic models of the OpenAI API as tokenmill serves it; /openapi.json is generated from them.

Requests are strict: a wrong type is an error (no "0.5" for a float), and an unknown field is an error, so a
parameter we do not support is refused with 400 instead of being silently ignored. OpenAI parameters that
exist but are not supported are declared (so the schema lists them) and refused unless left at a neutral value.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_serializer,
    model_validator,
)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_supported(name: str, value: Any, neutral: tuple, hint: str) -> Any:
    if value is None or value in neutral:
        return value
    raise ValueError(f"{name} is not supported by tokenmill: {hint}")


# JSON's "\ud800" escapes decode to lone UTF-16 surrogates, which are not Unicode text: no tokenizer can encode them.
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: Any, name: str) -> Any:
    """Refuse a string (or strings in a list) holding a lone surrogate, naming where it is."""
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            continue
        match = _SURROGATE.search(text)
        if match is not None:
            where = name if isinstance(value, str) else f"{name}[{i}]"
            raise ValueError(
                f"{where} holds a lone UTF-16 surrogate (U+{ord(match.group()):04X} at character {match.start()}), "
                "which is not valid Unicode text: send surrogates only in pairs, or the character itself"
            )
    return value


# ---- errors --------------------------------------------------------------------------------------------------
class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


# ---- shared pieces ---------------------------------------------------------------------------------------------
class StreamOptions(RequestModel):
    # Send a last chunk with the usage of the whole request (and choices: []).
    include_usage: bool | None = False
    # vLLM: also put the usage so far in every chunk.
    continuous_usage_stats: bool | None = False


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    # tokenmill's extension: engine seconds the request took (its share of every step), for cost metering.
    gpu_seconds: float | None = None


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Metadata = Annotated[dict[str, str], Field(max_length=16)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


class VllmSamplingExtras(RequestModel):
    """vLLM's extra sampling parameters, accepted by every generating endpoint."""

    top_k: int | None = Field(None, ge=-1, description="vLLM extra: keep the k most likely tokens; -1 or 0 = off.")
    min_p: Probability | None = Field(None, description="vLLM extra: drop tokens below min_p x the top probability.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0, description="vLLM extra; 1 = off.")
    min_tokens: int | None = Field(None, ge=0, description="vLLM extra: tokens generated before EOS/stop may end.")
    ignore_eos: bool | None = Field(None, description="vLLM extra: keep generating after EOS.")
    stop_token_ids: list[int] | None = Field(None, description="vLLM extra: token ids that end the output.")
    skip_special_tokens: bool | None = Field(None, description="vLLM extra: drop special tokens from the text.")
    include_stop_str_in_output: bool | None = Field(None, description="vLLM extra: keep the stop string.")


class SamplingFields(VllmSamplingExtras):
    """Parameters shared by /v1/completions and /v1/chat/completions (OpenAI's, then vLLM's extras)."""

    model: str | None = Field(None, description="A served model name; omitted: the server's model.")
    n: int | None = Field(1, ge=1, le=128, description="Completions to generate for each prompt.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy. Default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1,
                             description="Same seed and prompt give the same draws. The output is the same "
                             "whatever the batch in float32, or with the server's --batch-invariant; in bfloat16 "
                             "without it, batch mates can flip a token whose top two logits are within one "
                             "bfloat16 step.")
    stop: str | list[str] | None = Field(None, description="Strings that end the output (not included).")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="An end-user id; accepted and not used.")
    metadata: Metadata | None = Field(
        None, description="Free key/value pairs; metadata.feature tags the request for rate limits and cost metering."
    )
    logit_bias: Any = Field(None, description="Not supported (rejected unless null or {}).")
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* names.
    response_format: dict[str, Any] | None = Field(
        None, description="{'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': "
        "{'name', 'schema', 'strict'}}: the output is constrained to JSON (to the schema)."
    )
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM extra: one of {'json': schema}, {'regex': str}, {'choice': [str, ...]}, "
        "{'grammar': str} or {'json_object': true}, with optional disable_any_whitespace, backend."
    )
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM extra (older name): structured_outputs.json.")
    guided_regex: str | None = Field(None, description="vLLM extra (older name): structured_outputs.regex.")
    guided_choice: list[str] | None = Field(None, description="vLLM extra (older name): structured_outputs.choice.")
    guided_grammar: str | None = Field(None, description="vLLM extra (older name): structured_outputs.grammar.")

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        return _not_supported("logit_bias", value, ({},), "remove it (or send null)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return value

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def feature(self) -> str | None:
        return (self.metadata or {}).get("feature")


# ---- /v1/completions ---------------------------------------------------------------------------------------------
class CompletionRequest(SamplingFields):
    prompt: NonEmptyStr | list[NonEmptyStr] | list[TokenId] | list[list[TokenId]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists (none empty)."
    )
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate; default 16 (as OpenAI).")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return the logprobs of this many likely tokens.")
    best_of: int | None = Field(None, ge=1, description="Only best_of == n is supported.")
    echo: bool | None = Field(False, description="Not supported (rejected when true).")
    suffix: Any = Field(None, description="Not supported (rejected unless null).")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value):
        return _not_supported("suffix", value, ("",), "remove it (insertion is not implemented)")

    @field_validator("echo")
    @classmethod
    def _echo(cls, value):
        return _not_supported("echo", value, (False,), "remove it; the prompt is not repeated in the output")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("a token-id prompt must not be empty")
        return check_text(value, "prompt")

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError(f"best_of={self.best_of} with n={self.n or 1} is not supported: only best_of == n")
        return self


class CompletionLogProbs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


FinishReason = Literal["stop", "length"]


class CompletionResponseChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: FinishReason | None = None
    # vLLM extra: the stop string or stop token id that ended the output (None for EOS or length).
    stop_reason: int | str | None = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionResponseStreamChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class CompletionStreamResponse(ResponseModel):
    """One server-sent event of a streamed completion (`data: {...}`); the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---- /v1/chat/completions ----------------------------------------------------------------------------------------
class ContentPart(RequestModel):
    type: str
    text: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value):
        if isinstance(value, dict) and value.get("type") != "text":
            raise ValueError(
                f"content part type {value.get('type')!r} is not supported: tokenmill serves text models; "
                "send {'type': 'text', 'text': ...} parts or a string"
            )
        if isinstance(value, dict) and not isinstance(value.get("text"), str):
            raise ValueError("a text content part needs 'text' (a string)")
        if isinstance(value, dict):
            check_text(value["text"], "text")
        return value


# ---- tools ------------------------------------------------------------------------------------------------------
ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]


class FunctionDefinition(RequestModel):
    name: ToolName = Field(description="The function's name: letters, digits, _, -, . (at most 64).")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON schema of the arguments object; omitted: no arguments.")
    strict: bool | None = Field(None, description="Calls are always constrained to the schema (as strict).")


class ChatCompletionToolParam(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: ToolName


class ChatCompletionNamedToolChoiceParam(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCall(RequestModel):
    name: str
    # The arguments as JSON text (OpenAI's shape).
    arguments: str


class ChatCompletionMessageToolCall(RequestModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # tool messages: the id of the call this is the result of.
    tool_call_id: str | None = None
    # assistant messages: the calls it made (content may then be null).
    tool_calls: list[ChatCompletionMessageToolCall] | None = None
    # Echoed back by SDKs that resend a reply's message object (refusal: null); only null is accepted.
    refusal: Any = Field(None, description="Only null (replies carry no refusals).")

    @field_validator("refusal")
    @classmethod
    def _refusal(cls, value):
        return _not_supported("refusal", value, (), "send the assistant's text as content")

    @field_validator("content", "name")
    @classmethod
    def _text(cls, value, info):
        return check_text(value, info.field_name) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role} messages")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    max_tokens: int | None = Field(None, ge=1, description="Deprecated name of max_completion_tokens.")
    logprobs: bool | None = Field(False, description="Return the logprob of each output token.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: this many likely tokens too.")
    tools: list[ChatCompletionToolParam] | None = Field(
        None, description="Functions the model may call; see tool_choice and docs/tool_calling.md.")
    tool_choice: Literal["none", "auto", "required"] | ChatCompletionNamedToolChoiceParam | None = Field(
        None, description="'none', 'auto' (needs --enable-auto-tool-choice and --tool-call-parser), 'required' or "
        "{'type': 'function', 'function': {'name': ...}}; default 'auto' with tools, else 'none'. 'required' "
        "and named calls are constrained to the tools' schemas, and so is a call the model opens in 'auto'.")
    parallel_tool_calls: bool | None = Field(None, description="Allow several calls in one reply (default true).")
    functions: Any = Field(None, description="Not supported.")
    function_call: Any = Field(None, description="Only 'none' is supported.")
    store: bool | None = Field(None, description="Only false is supported (nothing is stored).")
    service_tier: Any = Field(None, description="Only 'auto' or 'default'.")
    modalities: Any = Field(None, description="Only ['text'].")
    audio: Any = Field(None, description="Not supported.")
    prediction: Any = Field(None, description="Not supported.")
    reasoning_effort: Any = Field(None, description="Not supported.")
    web_search_options: Any = Field(None, description="Not supported.")
    # vLLM's chat extras.
    add_generation_prompt: bool | None = Field(True, description="vLLM extra: end the prompt with the assistant turn.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM extra: variables for the template.")

    @field_validator("functions")
    @classmethod
    def _functions(cls, value):
        return _not_supported("functions", value, ([],), "functions is deprecated: send tools")

    @field_validator("function_call")
    @classmethod
    def _function_call(cls, value):
        return _not_supported("function_call", value, ("none",), "function_call is deprecated: send tool_choice")

    @field_validator("store")
    @classmethod
    def _store(cls, value):
        return _not_supported("store", value, (False,), "completions are not stored")

    @field_validator("service_tier")
    @classmethod
    def _service_tier(cls, value):
        return _not_supported("service_tier", value, ("auto", "default"), "there is one tier")

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value):
        return _not_supported("modalities", value, (["text"],), "only text output")

    @field_validator("audio", "prediction", "reasoning_effort", "web_search_options")
    @classmethod
    def _unsupported(cls, value, info):
        return _not_supported(info.field_name, value, (), "remove it")

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class ChatCompletionLogProb(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(ResponseModel):
    content: list[ChatCompletionLogProbsContent] | None = None
    refusal: list[ChatCompletionLogProbsContent] | None = None


class ToolCallFunction(ResponseModel):
    name: str
    # The arguments' JSON text, as generated (constrained to the tool's schema unless tool_choice was "none").
    arguments: str


class ToolCall(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


# "tool_calls": the reply ended after its tool calls.
ChatFinishReason = Literal["stop", "length", "tool_calls"]


class ChatResponseMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionResponseChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: ChatFinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(ResponseModel):
    """The new part of a streamed message; fields without news are left out."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(ResponseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(ResponseModel):
    """A streamed tool call's news: its first delta carries id, type and name; later ones more arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionResponseStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: ChatFinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(ResponseModel):
    """One server-sent event of a streamed chat completion (`data: {...}`); the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---- /v1/models ----------------------------------------------------------------------------------------------------
class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenmill"
    # The model directory or file the name serves.
    root: str | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- /tokenize, /detokenize (vLLM's) -----------------------------------------------------------------------------------
class TokenizeCompletionRequest(RequestModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        return check_text(value, "prompt")


class TokenizeChatRequest(RequestModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    # The chat template writes the special tokens itself.
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


def _tokenize_form(body: Any) -> str:
    """Which form a /tokenize body takes: chat messages when it has "messages", else a prompt."""
    if isinstance(body, dict):
        return TOKENIZE_CHAT if "messages" in body else TOKENIZE_PROMPT
    return TOKENIZE_CHAT if isinstance(body, TokenizeChatRequest) else TOKENIZE_PROMPT


# Tags of the two /tokenize forms; they appear in validation error locations, which leave them out.
TOKENIZE_PROMPT, TOKENIZE_CHAT = "tokenize-prompt", "tokenize-messages"
TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag(TOKENIZE_PROMPT)] | Annotated[TokenizeChatRequest, Tag(TOKENIZE_CHAT)],
    Discriminator(_tokenize_form),
]


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(ResponseModel):
    prompt: str


class HealthResponse(ResponseModel):
    status: Literal["ok", "loading", "draining", "failed"]
