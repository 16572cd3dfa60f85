"""POST /v1/responses: OpenAI's Responses API over the chat path (same template, guardrails and metrics).

The input (text, or messages) with instructions first as a system message is rendered with the chat
template exactly as /v1/chat/completions renders the same messages, so greedy outputs are equal. A stream
sends the Responses API's semantic events, each as `event: <type>` and `data: <json>` with a
sequence_number, and ends with response.completed (response.incomplete when max_output_tokens cut it).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from tokenmill.entrypoints.openai.errors import OpenAIError
from tokenmill.entrypoints.openai.protocol import ChatMessage
from tokenmill.entrypoints.openai.protocol_responses import (
    IncompleteDetails,
    ResponseInputTokensDetails,
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
    merge_outputs,
    unless_disconnected,
)
from tokenmill.outputs import RequestOutput


def sse_event(event_type: str, payload: dict[str, Any]) -> str:
    """One Responses API server-sent event: named as its type, as OpenAI frames them."""
    return f"event: {event_type}\ndata: {json.dumps(payload)}\n\n"


class OpenAIServingResponses(OpenAIServing):
    async def create_response(self, request: ResponsesRequest, ctx: RequestContext
                              ) -> ResponsesResponse | AsyncIterator[str]:
        model_name = self.check_model(request.model)
        feature = self.resolve_feature(request.feature, ctx.feature_header)
        self.reserve_queue(ctx)
        prompt = await self.in_thread(self._prompt, request)
        max_tokens = self.resolve_max_tokens(prompt, request.max_output_tokens, self.config.default_max_tokens,
                                             "max_output_tokens")
        params = self.sampling_params(request, max_tokens, None)
        reservation = self.admit(ctx.api_key, feature, len(prompt.token_ids) + max_tokens)
        state = _State(request, model_name, prompt)
        stream = self.generate(state.response_id, prompt, params, ctx, feature)
        if request.stream:
            return self._stream(state, stream, reservation)
        try:
            state.output = await unless_disconnected(ctx.raw_request, final_output(stream))
        finally:
            self.limiter.settle(reservation, state.num_tokens_used())
        return state.response()

    def _prompt(self, request: ResponsesRequest) -> Prompt:
        """The chat prompt of the instructions and input; call from a worker thread (in_thread)."""
        return self.chat_prompt(self._messages(request), param="input")

    @staticmethod
    def _messages(request: ResponsesRequest) -> list[ChatMessage]:
        messages = []
        if request.instructions is not None:
            messages.append(ChatMessage(role="system", content=request.instructions))
        if isinstance(request.input, str):
            messages.append(ChatMessage(role="user", content=request.input))
        else:
            messages += [ChatMessage(role=m.role, content=m.text()) for m in request.input]
        return messages

    async def _stream(self, state: _State, stream: AsyncIterator[RequestOutput], reservation) -> AsyncIterator[str]:
        seq = 0

        def event(event_type: str, **fields: Any) -> str:
            nonlocal seq
            payload = {"type": event_type, "sequence_number": seq, **fields}
            seq += 1
            return sse_event(event_type, payload)

        item_id = state.item_id
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        try:
            yield event("response.created", response=state.response(in_progress=True).model_dump(mode="json"))
            yield event("response.in_progress", response=state.response(in_progress=True).model_dump(mode="json"))
            yield event("response.output_item.added", output_index=0,
                        item=ResponseOutputMessage(id=item_id, status="in_progress").model_dump(mode="json"))
            yield event("response.content_part.added", **where,
                        part=ResponseOutputText(text="").model_dump(mode="json"))
            sent = 0
            async with contextlib.aclosing(merge_outputs([stream])) as outputs:
                async for _, output in outputs:
                    state.output = output
                    text = output.outputs[0].text
                    if len(text) > sent:
                        yield event("response.output_text.delta", **where, delta=text[sent:], logprobs=[])
                        sent = len(text)
            final = state.response()
            message = final.output[0]
            part = message.content[0]
            yield event("response.output_text.done", **where, text=part.text, logprobs=[])
            yield event("response.content_part.done", **where, part=part.model_dump(mode="json"))
            yield event("response.output_item.done", output_index=0, item=message.model_dump(mode="json"))
            done_type = "response.completed" if final.status == "completed" else "response.incomplete"
            yield event(done_type, response=final.model_dump(mode="json"))
        except Exception as e:
            error = e if isinstance(e, OpenAIError) else engine_error(e)
            yield event("error", code=error.code or error.type, message=error.message, param=error.param)
        finally:
            self.limiter.settle(reservation, state.num_tokens_used())


class _State:
    """One Responses request: what its response echoes, and the engine's latest output."""

    def __init__(self, request: ResponsesRequest, model_name: str, prompt: Prompt) -> None:
        self.request = request
        self.model_name = model_name
        self.prompt = prompt
        self.response_id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.output: RequestOutput | None = None

    def num_tokens_used(self) -> int:
        output = self.output
        return len(self.prompt.token_ids) + (len(output.outputs[0].token_ids) if output is not None else 0)

    def response(self, in_progress: bool = False) -> ResponsesResponse:
        """The response object: in progress (no output yet), or from the finished output."""
        request, output = self.request, self.output
        incomplete = None
        items = []
        usage = None
        status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
        if not in_progress:
            assert output is not None and output.finished
            completion = output.outputs[0]
            cut = completion.finish_reason == "length"
            status = "incomplete" if cut else "completed"
            incomplete = IncompleteDetails(reason="max_output_tokens") if cut else None
            items = [ResponseOutputMessage(id=self.item_id, status=status,
                                           content=[ResponseOutputText(text=completion.text)])]
            num_input, num_output = len(self.prompt.token_ids), len(completion.token_ids)
            usage = ResponseUsage(
                input_tokens=num_input, output_tokens=num_output, total_tokens=num_input + num_output,
                input_tokens_details=ResponseInputTokensDetails(cached_tokens=output.num_cached_tokens),
            )
        return ResponsesResponse(
            id=self.response_id, created_at=self.created_at, status=status, incomplete_details=incomplete,
            instructions=request.instructions, max_output_tokens=request.max_output_tokens, model=self.model_name,
            output=items, temperature=request.temperature, top_p=request.top_p,
            tool_choice=request.tool_choice or "none", metadata=dict(request.metadata or {}), user=request.user,
            usage=usage,
        )
