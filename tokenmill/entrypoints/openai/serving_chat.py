"""POST /v1/chat/completions: messages rendered with the model's chat template, replies streamed or whole."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from tokenmill.entrypoints.openai.errors import OpenAIError
from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    DeltaMessage,
)
from tokenmill.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    RequestContext,
    engine_error,
    error_event,
    final_output,
    first_output_or_error,
    merge_outputs,
    sse,
    unless_disconnected,
)
from tokenmill.entrypoints.openai.structured_outputs import structured_outputs_params
from tokenmill.entrypoints.openai.tool_parsers.abstract_tool_parser import ToolParser
from tokenmill.entrypoints.openai.tool_parsers.tool_calling import (
    ToolCallStream,
    finish_reason,
    message_tool_calls,
    resolve_tool_calling,
)
from tokenmill.outputs import PositionLogprobs, RequestOutput


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs] | None, num_top: int
                  ) -> ChatCompletionLogProbs:
    content = []
    for token_id, position in zip(token_ids, positions or []):
        chosen = position.get(token_id)
        if chosen is None:
            continue
        token = chosen.decoded_token or ""
        top = sorted((lp for lp in position.values() if lp.rank <= num_top), key=lambda lp: lp.rank)
        content.append(ChatCompletionLogProbsContent(
            token=token, logprob=chosen.logprob, bytes=list(token.encode("utf-8")),
            top_logprobs=[
                ChatCompletionLogProb(token=lp.decoded_token or "", logprob=lp.logprob,
                                      bytes=list((lp.decoded_token or "").encode("utf-8")))
                for lp in top[:num_top]
            ],
        ))
    return ChatCompletionLogProbs(content=content)


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest, ctx: RequestContext
                                     ) -> ChatCompletionResponse | AsyncIterator[str]:
        model_name = self.check_model(request.model)
        feature = self.resolve_feature(request.feature, ctx.feature_header)
        self.check_num_prompts(1, request.n or 1)
        tool_calling = resolve_tool_calling(request, self.config.tool_call_parser,
                                            self.config.enable_auto_tool_choice, structured_outputs_params(request))
        parser = tool_calling.parser if tool_calling is not None else None
        self.reserve_queue(ctx)
        prompt = await self.in_thread(self.chat_prompt, request.messages, request.add_generation_prompt is not False,
                                      request.chat_template_kwargs, "messages",
                                      tool_calling.template_tools if tool_calling is not None else None)
        if request.max_completion_tokens is not None:
            requested, param = request.max_completion_tokens, "max_completion_tokens"
        else:
            requested, param = request.max_tokens, "max_tokens"
        max_tokens = self.resolve_max_tokens(prompt, requested, self.config.default_max_tokens, param)
        num_top = request.top_logprobs or 0
        params = self.sampling_params(request, max_tokens, num_top if request.logprobs else None)
        if tool_calling is not None and tool_calling.structured_outputs is not None:
            params = dataclasses.replace(params, structured_outputs=tool_calling.structured_outputs)
        n = params.n
        reservation = self.admit(ctx.api_key, feature, len(prompt.token_ids) + max_tokens * n)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = self.generate(request_id, prompt, params, ctx, feature)
        created = int(time.time())
        if request.stream:
            if params.structured_outputs is not None:
                try:  # a grammar that does not compile is a 400, not an error event in a started stream
                    stream = await first_output_or_error(ctx.raw_request, stream)
                except BaseException:
                    self.limiter.settle(reservation, _tokens_used(prompt.token_ids, None))
                    raise
            options = request.stream_options
            return self._stream(request_id, model_name, created, prompt, stream, reservation, n,
                                num_top if request.logprobs else None,
                                bool(options and options.include_usage),
                                bool(options and options.continuous_usage_stats), parser)
        final: list[RequestOutput] = []
        try:
            final.append(await unless_disconnected(ctx.raw_request, final_output(stream)))
        finally:
            self.limiter.settle(reservation, _tokens_used(prompt.token_ids, final[0] if final else None))
        output = final[0]
        choices = []
        for c in output.outputs:
            message = ChatResponseMessage(content=c.text)
            reason = c.finish_reason
            if parser is not None:
                extracted = parser.extract(c.text, final=True)
                message = ChatResponseMessage(content=extracted.content or None,
                                              tool_calls=message_tool_calls(extracted))
                reason = finish_reason(reason, extracted)
            choices.append(ChatCompletionResponseChoice(
                index=c.index, message=message,
                logprobs=chat_logprobs(c.token_ids, c.logprobs, num_top) if request.logprobs else None,
                finish_reason=reason, stop_reason=c.stop_reason,
            ))
        return ChatCompletionResponse(id=request_id, created=created, model=model_name, choices=choices,
                                      usage=self.usage([prompt], [output]))

    async def _stream(self, request_id, model_name, created, prompt, stream, reservation, n: int,
                      num_top: int | None, include_usage: bool, continuous_usage: bool,
                      parser: ToolParser | None = None) -> AsyncIterator[str]:
        sent_text = [0] * n
        # With a tool parser, each choice's text goes through it: content and tool-call deltas.
        tool_streams = [ToolCallStream(parser) for _ in range(n)] if parser is not None else None
        sent_tokens = [0] * n
        last: RequestOutput | None = None

        def chunk(choices, usage=None) -> str:
            return sse(ChatCompletionStreamResponse(id=request_id, created=created, model=model_name,
                                                    choices=choices, usage=usage).model_dump_json())

        try:
            # The first event of each choice carries the role, as OpenAI's.
            for i in range(n):
                yield chunk([ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                                            content=""))])
            async with contextlib.aclosing(merge_outputs([stream])) as outputs:
                async for _, output in outputs:
                    last = output
                    for c in output.outputs:
                        i = c.index
                        delta: str | None = c.text[sent_text[i]:]
                        reason = c.finish_reason
                        tool_deltas = None
                        if tool_streams is not None:
                            delta, tool_deltas, extracted = tool_streams[i].update(c.text, reason is not None)
                            reason = finish_reason(reason, extracted)
                        num_tokens = len(c.token_ids)
                        logprobs = None
                        if num_top is not None and num_tokens > sent_tokens[i]:
                            logprobs = chat_logprobs(c.token_ids[sent_tokens[i]:],
                                                     (c.logprobs or [])[sent_tokens[i]:num_tokens], num_top)
                        if not delta and not tool_deltas and reason is None and logprobs is None:
                            continue
                        sent_text[i] = len(c.text)
                        sent_tokens[i] = num_tokens
                        usage = self.usage([prompt], [output]) if continuous_usage else None
                        if tool_streams is not None and not delta:
                            delta = None  # no content news: leave content out of the delta
                        yield chunk([ChatCompletionResponseStreamChoice(
                            index=i, delta=DeltaMessage(content=delta, tool_calls=tool_deltas or None),
                            logprobs=logprobs, finish_reason=reason, stop_reason=c.stop_reason,
                        )], usage)
            if include_usage:
                yield chunk([], self.usage([prompt], [last]))
        except OpenAIError as e:
            yield error_event(e)
        except Exception as e:
            yield error_event(engine_error(e))
        finally:
            self.limiter.settle(reservation, _tokens_used(prompt.token_ids, last))
        yield SSE_DONE


def _tokens_used(prompt_token_ids: list[int], output: RequestOutput | None) -> int:
    return len(prompt_token_ids) + (sum(len(c.token_ids) for c in output.outputs) if output is not None else 0)
