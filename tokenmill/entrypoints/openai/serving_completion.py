"""POST /v1/completions: prompts in, text out (streamed as server-sent events or in one response)."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator

from tokenmill.entrypoints.openai.errors import OpenAIError
from tokenmill.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
)
from tokenmill.entrypoints.openai.serving_engine import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    SSE_DONE,
    OpenAIServing,
    Prompt,
    RequestContext,
    engine_error,
    error_event,
    first_output_or_error,
    merge_outputs,
    sse,
    unless_disconnected,
)
from tokenmill.outputs import PositionLogprobs, RequestOutput


def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs] | None, first_offset: int,
                        ) -> CompletionLogProbs:
    """Legacy-completions logprobs of some output tokens; text offsets start at first_offset."""
    result = CompletionLogProbs()
    offset = first_offset
    for token_id, position in zip(token_ids, positions or []):
        chosen = position.get(token_id)
        token = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None else ""
        result.tokens.append(token)
        result.token_logprobs.append(chosen.logprob if chosen is not None else None)
        result.top_logprobs.append({lp.decoded_token or "": lp.logprob for lp in position.values()})
        result.text_offset.append(offset)
        offset += len(token)
    return result


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, ctx: RequestContext
                                ) -> CompletionResponse | AsyncIterator[str]:
        model_name = self.check_model(request.model)
        feature = self.resolve_feature(request.feature, ctx.feature_header)
        n = request.n or 1
        num_prompts = _num_prompts(request.prompt)
        self.check_num_prompts(num_prompts, n)
        self.reserve_queue(ctx, num_prompts)
        prompts = await self.in_thread(self._prompts, request.prompt)
        params = []
        for prompt in prompts:
            max_tokens = self.resolve_max_tokens(prompt, request.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS,
                                                 "max_tokens")
            params.append(self.sampling_params(request, max_tokens, request.logprobs))
        num_tokens = sum(len(p.token_ids) + sp.max_tokens * n for p, sp in zip(prompts, params))
        reservation = self.admit(ctx.api_key, feature, num_tokens)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = [
            self.generate(request_id if len(prompts) == 1 else f"{request_id}-{i}", prompt, sp, ctx, feature)
            for i, (prompt, sp) in enumerate(zip(prompts, params))
        ]
        state = _State(request_id, model_name, prompts, n, request.logprobs is not None)
        if request.stream:
            if any(sp.structured_outputs is not None for sp in params):
                try:  # a grammar that does not compile is a 400, not an error event in a started stream
                    streams = [await first_output_or_error(ctx.raw_request, s) for s in streams]
                except BaseException:
                    for s in streams:
                        await s.aclose()  # type: ignore[attr-defined]
                    self.limiter.settle(reservation, state.num_tokens_used())
                    raise
            options = request.stream_options
            return self._stream(state, streams, reservation,
                                bool(options and options.include_usage),
                                bool(options and options.continuous_usage_stats))
        try:
            return await unless_disconnected(ctx.raw_request, self._full(state, streams))
        finally:
            self.limiter.settle(reservation, state.num_tokens_used())

    def _prompts(self, prompt) -> list[Prompt]:
        if isinstance(prompt, str):
            return [self.text_prompt(prompt)]
        if isinstance(prompt[0], int):
            return [self.token_prompt(prompt)]
        if isinstance(prompt[0], str):
            return [self.text_prompt(p, param=f"prompt[{i}]") for i, p in enumerate(prompt)]
        return [self.token_prompt(p, param=f"prompt[{i}]") for i, p in enumerate(prompt)]

    async def _full(self, state: _State, streams) -> CompletionResponse:
        try:
            async for index, output in merge_outputs(streams):
                state.outputs[index] = output
        except Exception as e:
            raise engine_error(e) from None
        choices = []
        for prompt_index, output in enumerate(state.outputs):
            assert output is not None and output.finished
            for completion in output.outputs:
                logprobs = None
                if state.logprobs:
                    logprobs = completion_logprobs(completion.token_ids, completion.logprobs, 0)
                choices.append(CompletionResponseChoice(
                    index=prompt_index * state.n + completion.index, text=completion.text, logprobs=logprobs,
                    finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
                ))
        return CompletionResponse(id=state.request_id, created=state.created, model=state.model_name,
                                  choices=choices, usage=self.usage(state.prompts, state.outputs))

    async def _stream(self, state: _State, streams, reservation, include_usage: bool,
                      continuous_usage: bool) -> AsyncIterator[str]:
        num_choices = len(state.prompts) * state.n
        sent_text = [0] * num_choices  # characters of text sent per choice
        sent_tokens = [0] * num_choices
        text_offset = [0] * num_choices
        try:
            async with contextlib.aclosing(merge_outputs(streams)) as outputs:
                async for prompt_index, output in outputs:
                    state.outputs[prompt_index] = output
                    for completion in output.outputs:
                        i = prompt_index * state.n + completion.index
                        delta = completion.text[sent_text[i]:]
                        num_tokens = len(completion.token_ids)
                        logprobs = None
                        if state.logprobs and num_tokens > sent_tokens[i]:
                            new_ids = completion.token_ids[sent_tokens[i]:]
                            new_positions = (completion.logprobs or [])[sent_tokens[i]:num_tokens]
                            logprobs = completion_logprobs(new_ids, new_positions, text_offset[i])
                            text_offset[i] += sum(len(t) for t in logprobs.tokens)
                        if not delta and completion.finish_reason is None and logprobs is None:
                            continue
                        sent_text[i] = len(completion.text)
                        sent_tokens[i] = num_tokens
                        if logprobs is None and not continuous_usage:
                            yield state.text_event(i, delta, completion.finish_reason, completion.stop_reason)
                            continue
                        chunk = CompletionStreamResponse(
                            id=state.request_id, created=state.created, model=state.model_name,
                            choices=[CompletionResponseStreamChoice(
                                index=i, text=delta, logprobs=logprobs, finish_reason=completion.finish_reason,
                                stop_reason=completion.stop_reason,
                            )],
                            usage=self.usage(state.prompts, state.outputs) if continuous_usage else None,
                        )
                        yield sse(chunk.model_dump_json())
            if include_usage:
                chunk = CompletionStreamResponse(id=state.request_id, created=state.created,
                                                 model=state.model_name, choices=[],
                                                 usage=self.usage(state.prompts, state.outputs))
                yield sse(chunk.model_dump_json())
        except OpenAIError as e:
            yield error_event(e)
        except Exception as e:
            yield error_event(engine_error(e))
        finally:
            self.limiter.settle(reservation, state.num_tokens_used())
        yield SSE_DONE


# A JSON string literal as pydantic writes it (non-ASCII characters as themselves, control characters escaped);
# the C encoder the json module uses for ensure_ascii=False, without json.dumps's per-call setup.
_json_str = json.encoder.encode_basestring  # type: ignore[attr-defined]


def _num_prompts(prompt) -> int:
    """How many prompts a request's prompt holds (one string or token-id list, or a list of them)."""
    return len(prompt) if isinstance(prompt, list) and not isinstance(prompt[0], int) else 1


class _State:
    """One completion request's outputs as they arrive."""

    def __init__(self, request_id: str, model_name: str, prompts: list[Prompt], n: int, logprobs: bool) -> None:
        self.request_id = request_id
        self.model_name = model_name
        self.prompts = prompts
        self.n = n
        self.logprobs = logprobs
        self.created = int(time.time())
        self.outputs: list[RequestOutput | None] = [None] * len(prompts)
        # The fixed head of this request's text events, up to a choice's index: built once, not per token.
        self._event_head = (f'data: {{"id":{_json_str(request_id)},"object":"text_completion","created":'
                            f'{self.created},"model":{_json_str(model_name)},"choices":[{{"index":')

    def text_event(self, index: int, text: str, finish_reason: str | None, stop_reason: int | str | None) -> str:
        """The server-sent event of one choice's new text (no logprobs, no usage): the same JSON as
        CompletionStreamResponse(...).model_dump_json() framed by sse(), written from a template. Every streamed
        token of every request comes through here; building and dumping the pydantic models took about five
        times as long (45 us vs 9 us an event)."""
        tail = ',"logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}\n\n'
        if finish_reason is not None or stop_reason is not None:
            tail = (f',"logprobs":null,"finish_reason":{json.dumps(finish_reason, ensure_ascii=False)},'
                    f'"stop_reason":{json.dumps(stop_reason, ensure_ascii=False)}}}],"usage":null}}\n\n')
        return f'{self._event_head}{index},"text":{_json_str(text)}{tail}'

    def num_tokens_used(self) -> int:
        used = sum(len(p.token_ids) for p in self.prompts)
        return used + sum(len(c.token_ids) for o in self.outputs if o is not None for c in o.outputs)
