"""POST /v1/responses: OpenAI's Responses API over the chat path (same template, guardrails and metrics).

The input (text, or items) with instructions first as a system message is rendered with the chat template
exactly as /v1/chat/completions renders the same messages, so greedy outputs are equal. function_call input
items become an assistant message's tool_calls and function_call_output items tool messages. text.format and
function tools are constrained and parsed as on chat (tool_parsers/tool_calling.py); calls come out as
function_call output items. A stream sends the Responses API's semantic events, each as `event: <type>` and
`data: <json>` with a sequence_number, and ends with response.completed (response.incomplete when
max_output_tokens cut it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from tokenmill.entrypoints.openai.errors import OpenAIError
from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionMessageToolCall,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionToolParam,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    NamedFunction,
)
from tokenmill.entrypoints.openai.protocol_responses import (
    IncompleteDetails,
    ResponseFunctionCallItem,
    ResponseFunctionCallOutputItem,
    ResponseFunctionToolCall,
    ResponseInputTokensDetails,
    ResponseNamedToolChoice,
    ResponseOutputItem,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponsesRequest,
    ResponsesResponse,
    ResponseUsage,
)
from tokenmill.entrypoints.openai.serving_engine import (
    OpenAIServing,
    Prompt,
    RequestContext,
    engine_error,
    final_output,
    first_output_or_error,
    merge_outputs,
    unless_disconnected,
)
from tokenmill.entrypoints.openai.structured_outputs import structured_outputs_params
from tokenmill.entrypoints.openai.tool_parsers.abstract_tool_parser import ExtractedToolCalls, ToolParser
from tokenmill.entrypoints.openai.tool_parsers.tool_calling import ToolCalling, ToolCallStream, resolve_tools
from tokenmill.outputs import RequestOutput


def sse_event(event_type: str, payload: dict[str, Any]) -> str:
    """One Responses API server-sent event: named as its type, as OpenAI frames them."""
    return f"event: {event_type}\ndata: {json.dumps(payload)}\n\n"


class OpenAIServingResponses(OpenAIServing):
    async def create_response(self, request: ResponsesRequest, ctx: RequestContext
                              ) -> ResponsesResponse | AsyncIterator[str]:
        model_name = self.check_model(request.model)
        feature = self.resolve_feature(request.feature, ctx.feature_header)
        tool_calling = self._tool_calling(request)
        self.reserve_queue(ctx)
        prompt = await self.in_thread(self._prompt, request, tool_calling)
        max_tokens = self.resolve_max_tokens(prompt, request.max_output_tokens, self.config.default_max_tokens,
                                             "max_output_tokens")
        params = _responses_errors(lambda: self.sampling_params(request, max_tokens, None))
        if tool_calling is not None and tool_calling.structured_outputs is not None:
            params = dataclasses.replace(params, structured_outputs=tool_calling.structured_outputs)
        reservation = self.admit(ctx.api_key, feature, len(prompt.token_ids) + max_tokens)
        state = _State(request, model_name, prompt, tool_calling.parser if tool_calling is not None else None)
        stream = self.generate(state.response_id, prompt, params, ctx, feature)
        if request.stream:
            if params.structured_outputs is not None:
                try:  # a grammar that does not compile is a 400, not an error event in a started stream
                    stream = await first_output_or_error(ctx.raw_request, stream)
                except BaseException:
                    self.limiter.settle(reservation, state.num_tokens_used())
                    raise
            return self._stream(state, stream, reservation)
        try:
            state.output = await unless_disconnected(ctx.raw_request, final_output(stream))
        finally:
            self.limiter.settle(reservation, state.num_tokens_used())
        return state.response()

    def _tool_calling(self, request: ResponsesRequest) -> ToolCalling | None:
        """The request's tools and tool_choice as on chat, with errors naming the Responses parameters."""
        tools = [
            ChatCompletionToolParam(function=FunctionDefinition(
                name=tool.name, description=tool.description, parameters=tool.parameters, strict=tool.strict))
            for tool in request.tools or []
        ]
        choice: Any = request.tool_choice
        if isinstance(choice, ResponseNamedToolChoice):
            choice = ChatCompletionNamedToolChoiceParam(function=NamedFunction(name=choice.name))
        structured = _responses_errors(lambda: structured_outputs_params(request))
        return _responses_errors(lambda: resolve_tools(
            tools, choice, request.parallel_tool_calls, self.config.tool_call_parser,
            self.config.enable_auto_tool_choice, structured, structured_param="text.format"))

    def _prompt(self, request: ResponsesRequest, tool_calling: ToolCalling | None) -> Prompt:
        """The chat prompt of the instructions and input; call from a worker thread (in_thread)."""
        tools = tool_calling.template_tools if tool_calling is not None else None
        return self.chat_prompt(self._messages(request), param="input", tools=tools)

    @staticmethod
    def _messages(request: ResponsesRequest) -> list[ChatMessage]:
        messages = []
        if request.instructions is not None:
            messages.append(ChatMessage(role="system", content=request.instructions))
        if isinstance(request.input, str):
            messages.append(ChatMessage(role="user", content=request.input))
            return messages
        for item in request.input:
            if isinstance(item, ResponseFunctionCallItem):
                call = ChatCompletionMessageToolCall(
                    id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
                last = messages[-1] if messages else None
                if last is not None and last.role == "assistant":  # calls of one turn: one assistant message
                    last.tool_calls = [*(last.tool_calls or []), call]
                else:
                    messages.append(ChatMessage(role="assistant", tool_calls=[call]))
            elif isinstance(item, ResponseFunctionCallOutputItem):
                messages.append(ChatMessage(role="tool", content=item.output, tool_call_id=item.call_id))
            else:
                messages.append(ChatMessage(role=item.role, content=item.text()))
        return messages

    async def _stream(self, state: _State, stream: AsyncIterator[RequestOutput], reservation) -> AsyncIterator[str]:
        seq = 0

        def event(event_type: str, **fields: Any) -> str:
            nonlocal seq
            payload = {"type": event_type, "sequence_number": seq, **fields}
            seq += 1
            return sse_event(event_type, payload)

        # Output items in the order they opened: ("message", None) or ("call", call index).
        opened: list[tuple[str, int | None]] = []
        tool_stream = ToolCallStream(state.parser) if state.parser is not None else None
        sent = 0

        def open_message() -> list[str]:
            opened.append(("message", None))
            where = {"item_id": state.item_id, "output_index": len(opened) - 1, "content_index": 0}
            return [
                event("response.output_item.added", output_index=len(opened) - 1,
                      item=ResponseOutputMessage(id=state.item_id, status="in_progress").model_dump(mode="json")),
                event("response.content_part.added", **where, part=ResponseOutputText(text="").model_dump(mode="json")),
            ]

        try:
            yield event("response.created", response=state.response(in_progress=True).model_dump(mode="json"))
            yield event("response.in_progress", response=state.response(in_progress=True).model_dump(mode="json"))
            if tool_stream is None:  # plain text: the message opens at once
                for e in open_message():
                    yield e
            async with contextlib.aclosing(merge_outputs([stream])) as outputs:
                async for _, output in outputs:
                    state.output = output
                    completion = output.outputs[0]
                    if tool_stream is None:
                        text = completion.text
                        if len(text) > sent:
                            yield event("response.output_text.delta", item_id=state.item_id,
                                        output_index=0, content_index=0, delta=text[sent:], logprobs=[])
                            sent = len(text)
                        continue
                    content, deltas, _ = tool_stream.update(completion.text, completion.finish_reason is not None)
                    if content:
                        if ("message", None) not in opened:
                            for e in open_message():
                                yield e
                        yield event("response.output_text.delta", item_id=state.item_id,
                                    output_index=opened.index(("message", None)), content_index=0, delta=content,
                                    logprobs=[])
                    for delta in deltas:
                        if delta.id is not None:
                            opened.append(("call", delta.index))
                            added = ResponseFunctionToolCall(id=state.call_item_id(delta.index),
                                                             call_id=state.call_id(delta.index),
                                                             name=delta.function.name or "", arguments="",
                                                             status="in_progress")
                            yield event("response.output_item.added", output_index=len(opened) - 1,
                                        item=added.model_dump(mode="json"))
                        elif delta.function.arguments:
                            yield event("response.function_call_arguments.delta",
                                        item_id=state.call_item_id(delta.index),
                                        output_index=opened.index(("call", delta.index)),
                                        delta=delta.function.arguments)
            final = state.response()
            if tool_stream is not None:
                # The response lists its items in the order the stream opened them; an item that never opened
                # (a message with no text, when there is no call either) opens now.
                messages = [item for item in final.output if isinstance(item, ResponseOutputMessage)]
                calls = [item for item in final.output if isinstance(item, ResponseFunctionToolCall)]
                ordered: list[ResponseOutputItem] = [
                    messages[0] if kind == "message" else calls[index or 0] for kind, index in opened]
                for item in final.output:
                    if item not in ordered:
                        ordered.append(item)
                        yield event("response.output_item.added", output_index=len(ordered) - 1,
                                    item=item.model_copy(update={"status": "in_progress"}).model_dump(mode="json"))
                        if isinstance(item, ResponseOutputMessage):
                            yield event("response.content_part.added", item_id=item.id,
                                        output_index=len(ordered) - 1, content_index=0,
                                        part=ResponseOutputText(text="").model_dump(mode="json"))
                final.output = ordered
            for index, item in enumerate(final.output):
                if isinstance(item, ResponseOutputMessage):
                    where = {"item_id": item.id, "output_index": index, "content_index": 0}
                    part = item.content[0]
                    yield event("response.output_text.done", **where, text=part.text, logprobs=[])
                    yield event("response.content_part.done", **where, part=part.model_dump(mode="json"))
                else:
                    yield event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                                name=item.name, arguments=item.arguments)
                yield event("response.output_item.done", output_index=index, item=item.model_dump(mode="json"))
            done_type = "response.completed" if final.status == "completed" else "response.incomplete"
            yield event(done_type, response=final.model_dump(mode="json"))
        except Exception as e:
            error = e if isinstance(e, OpenAIError) else engine_error(e)
            yield event("error", code=error.code or error.type, message=error.message, param=error.param)
        finally:
            self.limiter.settle(reservation, state.num_tokens_used())


def _responses_errors(fn):
    """fn(), with chat's parameter names in its 400 turned into the Responses API's."""
    try:
        return fn()
    except OpenAIError as e:
        for chat_name, name in ((".function.parameters", ".parameters"), ("response_format.json_schema.schema",
                                "text.format.schema"), ("response_format.json_schema", "text.format"),
                                ("response_format", "text.format")):
            e.message = e.message.replace(chat_name, name)
            if e.param is not None:
                e.param = e.param.replace(chat_name, name)
        raise


class _State:
    """One Responses request: what its response echoes, and the engine's latest output."""

    def __init__(self, request: ResponsesRequest, model_name: str, prompt: Prompt, parser: ToolParser | None
                 ) -> None:
        self.request = request
        self.model_name = model_name
        self.prompt = prompt
        self.parser = parser
        self.response_id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.output: RequestOutput | None = None
        self._call_ids: list[tuple[str, str]] = []  # call index -> (item id, call id)

    def call_item_id(self, index: int) -> str:
        return self._ids(index)[0]

    def call_id(self, index: int) -> str:
        return self._ids(index)[1]

    def _ids(self, index: int) -> tuple[str, str]:
        while len(self._call_ids) <= index:
            self._call_ids.append((f"fc_{uuid.uuid4().hex}", f"call_{uuid.uuid4().hex}"))
        return self._call_ids[index]

    def num_tokens_used(self) -> int:
        output = self.output
        return len(self.prompt.token_ids) + (len(output.outputs[0].token_ids) if output is not None else 0)

    def response(self, in_progress: bool = False) -> ResponsesResponse:
        """The response object: in progress (no output yet), or from the finished output."""
        request, output = self.request, self.output
        incomplete = None
        items: list[ResponseOutputItem] = []
        usage = None
        status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
        if not in_progress:
            assert output is not None and output.finished
            completion = output.outputs[0]
            cut = completion.finish_reason == "length"
            status = "incomplete" if cut else "completed"
            incomplete = IncompleteDetails(reason="max_output_tokens") if cut else None
            items = self._items(completion.text, status)
            num_input, num_output = len(self.prompt.token_ids), len(completion.token_ids)
            usage = ResponseUsage(
                input_tokens=num_input, output_tokens=num_output, total_tokens=num_input + num_output,
                input_tokens_details=ResponseInputTokensDetails(cached_tokens=output.num_cached_tokens),
            )
        text_format = request.text.format if request.text is not None and request.text.format is not None else None
        return ResponsesResponse(
            id=self.response_id, created_at=self.created_at, status=status, incomplete_details=incomplete,
            instructions=request.instructions, max_output_tokens=request.max_output_tokens, model=self.model_name,
            output=items, temperature=request.temperature, top_p=request.top_p,
            tool_choice=_echo(request.tool_choice) or ("auto" if request.tools else "none"),
            tools=[tool.model_dump(exclude_none=True) for tool in request.tools or []],
            parallel_tool_calls=request.parallel_tool_calls is not False,
            text={"format": text_format.model_dump(exclude_none=True, by_alias=True)} if text_format is not None
            else {"format": {"type": "text"}},
            metadata=dict(request.metadata or {}), user=request.user, usage=usage,
        )

    def _items(self, text: str, status: Literal["completed", "incomplete"]) -> list[ResponseOutputItem]:
        if self.parser is None:
            return [ResponseOutputMessage(id=self.item_id, status=status, content=[ResponseOutputText(text=text)])]
        extracted: ExtractedToolCalls = self.parser.extract(text, final=True)
        items: list[ResponseOutputItem] = []
        if extracted.content or not extracted.tool_calls:
            items.append(ResponseOutputMessage(id=self.item_id, status=status,
                                               content=[ResponseOutputText(text=extracted.content)]))
        for index, call in enumerate(extracted.tool_calls):
            items.append(ResponseFunctionToolCall(
                id=self.call_item_id(index), call_id=self.call_id(index), name=call.name, arguments=call.arguments,
                status="completed" if call.complete else "incomplete"))
        return items


def _echo(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value
