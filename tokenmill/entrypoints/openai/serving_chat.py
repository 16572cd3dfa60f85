"""POST /v1/chat/completions: messages rendered with the model's chat template, replies streamed or whole."""

from __future__ import annotations

import contextlib
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
        self.reserve_queue(ctx)
        prompt = await self.in_thread(self.chat_prompt, request.messages, request.add_generation_prompt is not False,
                                      request.chat_template_kwargs)
        if request.max_completion_tokens is not None:
            requested, param = request.max_completion_tokens, "max_completion_tokens"
        else:
            requested, param = request.max_tokens, "max_tokens"
        max_tokens = self.resolve_max_tokens(prompt, requested, self.config.default_max_tokens, param)
        num_top = request.top_logprobs or 0
        params = self.sampling_params(request, max_tokens, num_top if request.logprobs else None)
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
                                bool(options and options.continuous_usage_stats))
        final: list[RequestOutput] = []
        try:
            final.append(await unless_disconnected(ctx.raw_request, final_output(stream)))
        finally:
            self.limiter.settle(reservation, _tokens_used(prompt.token_ids, final[0] if final else None))
        output = final[0]
        choices = [
            ChatCompletionResponseChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=chat_logprobs(c.token_ids, c.logprobs, num_top) if request.logprobs else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in output.outputs
        ]
        return ChatCompletionResponse(id=request_id, created=created, model=model_name, choices=choices,
                                      usage=self.usage([prompt], [output]))

    async def _stream(self, request_id, model_name, created, prompt, stream, reservation, n: int,
                      num_top: int | None, include_usage: bool, continuous_usage: bool) -> AsyncIterator[str]:
        sent_text = [0] * n
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
                        delta = c.text[sent_text[i]:]
                        num_tokens = len(c.token_ids)
                        logprobs = None
                        if num_top is not None and num_tokens > sent_tokens[i]:
                            logprobs = chat_logprobs(c.token_ids[sent_tokens[i]:],
                                                     (c.logprobs or [])[sent_tokens[i]:num_tokens], num_top)
                        if not delta and c.finish_reason is None and logprobs is None:
                            continue
                        sent_text[i] = len(c.text)
                        sent_tokens[i] = num_tokens
                        usage = self.usage([prompt], [output]) if continuous_usage else None
                        yield chunk([ChatCompletionResponseStreamChoice(
                            index=i, delta=DeltaMessage(content=delta), logprobs=logprobs,
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
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
