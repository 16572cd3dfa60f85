"""A chat request's tools and tool_choice turned into what the server does with them: the tools the chat
template receives, the constraint on the output, and how calls are read back out of the text (whole or
streamed, as OpenAI's tool_calls and tool-call deltas).

  tool_choice "none"        the template sees the tools; the output is text.
  "auto"                    needs --enable-auto-tool-choice and --tool-call-parser. Text or calls in the
                            parser's format; a call the model opens (the parser's trigger) is constrained.
  "required"                one or more calls (one unless parallel_tool_calls), constrained, in the parser's
                            format; without a parser, in llama3_json's (plain JSON, any model can write it).
  named function            that function's call, constrained: in the parser's format, or without a parser
                            the output is the arguments object alone (as vLLM).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from tokenmill.entrypoints.openai.errors import bad_request
from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionRequest,
    ChatCompletionToolParam,
    DeltaFunctionCall,
    DeltaToolCall,
    ToolCall,
    ToolCallFunction,
)
from tokenmill.entrypoints.openai.tool_parsers import get_tool_parser
from tokenmill.entrypoints.openai.tool_parsers.abstract_tool_parser import (
    ExtractedToolCall,
    ExtractedToolCalls,
    ToolParser,
)
from tokenmill.entrypoints.openai.tool_parsers.llama3_json_tool_parser import Llama3JsonToolParser
from tokenmill.structured_output.params import StructuredOutputsParams
from tokenmill.structured_output.tool_calls import tool_call_params
from tokenmill.structured_output.xgrammar_backend import unenforced_keywords

ToolChoice = Literal["none", "auto", "required"] | ChatCompletionNamedToolChoiceParam | None

# A tool without parameters takes no arguments (OpenAI's reading of an omitted schema).
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class NamedArgumentsParser(ToolParser):
    """A named tool_choice without a tool parser: the whole output is the arguments object of that tool."""

    name = "named_arguments"
    separator = ""
    trigger = ""

    def __init__(self, tool_name: str) -> None:
        self.tool_name = tool_name

    def extract(self, text: str, final: bool) -> ExtractedToolCalls:
        arguments = text.lstrip()
        if not arguments:
            return ExtractedToolCalls(content="")
        complete = final
        if final:
            try:
                json.loads(arguments)
            except json.JSONDecodeError:
                complete = False  # cut by max_tokens
        return ExtractedToolCalls(content="", tool_calls=[ExtractedToolCall(self.tool_name, arguments, complete)])

    def call_tag(self, tool_name: str, parameters: dict):  # pragma: no cover - not a tagged format
        raise NotImplementedError


@dataclass
class ToolCalling:
    """What one request's tools mean for the server."""

    # The tools as the chat template receives them (OpenAI's shape, as transformers passes them).
    template_tools: list[dict[str, Any]] | None
    # Reads calls from the output; None: the output is plain text (tool_choice "none").
    parser: ToolParser | None = None
    # The constraint on the output (None for "none").
    structured_outputs: StructuredOutputsParams | None = None


def resolve_tool_calling(request: ChatCompletionRequest, tool_call_parser: str | None,
                         enable_auto_tool_choice: bool, structured_outputs: StructuredOutputsParams | None
                         ) -> ToolCalling | None:
    """None when the request has no tools; else the ToolCalling. structured_outputs is the request's own
    constraint (response_format, ...), which only tool_choice "none" can be combined with. Raises a 400 naming
    the parameter for bad tools or tool_choice, and for "auto" on a server without auto tool choice."""
    return resolve_tools(request.tools or [], request.tool_choice, request.parallel_tool_calls, tool_call_parser,
                         enable_auto_tool_choice, structured_outputs)


def resolve_tools(tools: list[ChatCompletionToolParam], choice: ToolChoice, parallel_tool_calls: bool | None,
                  tool_call_parser: str | None, enable_auto_tool_choice: bool,
                  structured_outputs: StructuredOutputsParams | None, structured_param: str = "response_format"
                  ) -> ToolCalling | None:
    """resolve_tool_calling for any endpoint: its tools (in chat's shape), tool_choice and parallel_tool_calls.
    structured_param names the endpoint's structured-output parameter in errors."""
    if not tools:
        if isinstance(choice, ChatCompletionNamedToolChoiceParam) or choice == "required":
            raise bad_request(
                f"tool_choice {_choice_text(choice)} needs tools: send the function(s) in tools",
                param="tool_choice")
        return None
    names = [tool.function.name for tool in tools]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise bad_request(f"tools names the function(s) {', '.join(duplicates)} more than once: give each "
                          "function once", param="tools")
    schemas = {tool.function.name: _checked_parameters(tool.function.parameters, i) for i, tool in enumerate(tools)}
    template_tools = [tool.model_dump(exclude_none=True) for tool in tools]
    if choice is None:
        choice = "auto"
    if choice == "none":
        return ToolCalling(template_tools)
    if structured_outputs is not None:
        raise bad_request(
            f"tool_choice {_choice_text(choice)} constrains the output to tool calls, so {structured_param} "
            "cannot apply as well: send one of them (or tool_choice 'none')",
            param="tool_choice")
    parallel = parallel_tool_calls is not False
    parser = get_tool_parser(tool_call_parser) if tool_call_parser is not None else None
    if choice == "auto":
        if parser is None or not enable_auto_tool_choice:
            raise bad_request(
                '"auto" tool choice needs the server to be started with --enable-auto-tool-choice and '
                "--tool-call-parser NAME (hermes, llama3_json): restart it so, or send tool_choice 'required', "
                "a named function or 'none'", param="tool_choice")
        selected = list(schemas)
    elif choice == "required":
        selected = list(schemas)
    else:
        assert isinstance(choice, ChatCompletionNamedToolChoiceParam)
        if choice.function.name not in schemas:
            raise bad_request(
                f"tool_choice names the function {choice.function.name!r}, which is not in tools (tools has "
                f"{', '.join(map(repr, names))})", param="tool_choice")
        selected = [choice.function.name]
        parallel = False
        if parser is None:
            named = NamedArgumentsParser(choice.function.name)
            return ToolCalling(template_tools, named, StructuredOutputsParams(json=schemas[choice.function.name]))
    _check_enforceable(selected, schemas, names)
    if parser is None:
        parser = Llama3JsonToolParser()
    tags = [parser.call_tag(name, schemas[name]) for name in selected]
    mode: Literal["auto", "required"] = "auto" if choice == "auto" else "required"
    params = tool_call_params(tags, mode, parallel, parser.separator, parser.trigger)
    return ToolCalling(template_tools, parser, params)


def _choice_text(choice: Any) -> str:
    if isinstance(choice, ChatCompletionNamedToolChoiceParam):
        return f"{{'type': 'function', 'function': {{'name': {choice.function.name!r}}}}}"
    return repr(choice)


def _checked_parameters(parameters: dict[str, Any] | None, index: int) -> dict[str, Any]:
    param = f"tools[{index}].function.parameters"
    if parameters is None:
        return dict(_NO_PARAMETERS)
    try:
        # Validated like a response_format schema (JSON, the metaschema), naming the tool's parameter.
        return StructuredOutputsParams(json=parameters).schema or {}
    except ValueError as e:
        raise bad_request(str(e).replace("structured_outputs.json", param), param=param) from None


def _check_enforceable(selected: list[str], schemas: dict[str, dict[str, Any]], names: list[str]) -> None:
    for name in selected:
        keywords = unenforced_keywords(schemas[name])
        if keywords:
            param = f"tools[{names.index(name)}].function.parameters"
            raise bad_request(
                f"{param} uses the JSON-schema keyword(s) {', '.join(keywords)}, which tool calls cannot be "
                "constrained to: drop them from the schema", param=param)


# ---- output ----------------------------------------------------------------------------------------------------
def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def finish_reason(reason: str | None, extracted: ExtractedToolCalls) -> str | None:
    """"tool_calls" when the reply ended normally after complete calls; a cut reply stays "length" (and one a
    stop string cut inside a call "stop")."""
    if reason == "stop" and extracted.tool_calls and all(call.complete for call in extracted.tool_calls):
        return "tool_calls"
    return reason


def message_tool_calls(extracted: ExtractedToolCalls) -> list[ToolCall] | None:
    if not extracted.tool_calls:
        return None
    return [ToolCall(id=tool_call_id(), function=ToolCallFunction(name=call.name, arguments=call.arguments))
            for call in extracted.tool_calls]


@dataclass
class ToolCallStream:
    """One choice's streamed tool calls: what was sent so far, and the deltas for the text that came since."""

    parser: ToolParser
    sent_content: int = 0
    # Per call index: its id and the length of the arguments sent.
    ids: list[str] = field(default_factory=list)
    sent_arguments: list[int] = field(default_factory=list)

    def update(self, text: str, final: bool) -> tuple[str | None, list[DeltaToolCall], ExtractedToolCalls]:
        """(new content or None, new tool-call deltas, the extraction so far)."""
        extracted = self.parser.extract(text, final)
        content = extracted.content[self.sent_content:] or None
        self.sent_content = max(self.sent_content, len(extracted.content))
        deltas = []
        for index, call in enumerate(extracted.tool_calls):
            if index == len(self.ids):
                self.ids.append(tool_call_id())
                self.sent_arguments.append(0)
                deltas.append(DeltaToolCall(index=index, id=self.ids[index], type="function",
                                            function=DeltaFunctionCall(name=call.name, arguments="")))
            new = call.arguments[self.sent_arguments[index]:]
            if new:
                self.sent_arguments[index] = len(call.arguments)
                deltas.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=new)))
        return content, deltas, extracted
