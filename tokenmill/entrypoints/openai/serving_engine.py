"""What every endpoint shares: model names, prompts, max_tokens, SamplingParams, admission, SSE framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request

from tokenmill.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineStepError
from tokenmill.entrypoints.openai.errors import OpenAIError, bad_request, unavailable
from tokenmill.entrypoints.openai.protocol import ChatMessage, PromptTokensDetails, SamplingFields, UsageInfo
from tokenmill.entrypoints.openai.rate_limit import RateLimiter, Reservation
from tokenmill.entrypoints.openai.server_config import ApiKey, ServerConfig, check_feature
from tokenmill.metrics.prometheus import PrometheusStatLogger
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger("tokenmill.server")

T = TypeVar("T")

# OpenAI's default max_tokens for /v1/completions.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass
class RequestContext:
    """What the route knows about the HTTP request beyond its body."""

    api_key: ApiKey
    # The X-Feature header, if sent.
    feature_header: str | None
    # time.time() when the request arrived.
    arrival_time: float
    raw_request: Request | None = None


@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]

    def engine_input(self) -> dict:
        return {"prompt": self.text, "prompt_token_ids": self.token_ids}


def sse(payload: str) -> str:
    """One server-sent event. Every event of every stream goes through here: one framing for all."""
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        config: ServerConfig,
        model_names: Sequence[str],
        limiter: RateLimiter,
        metrics: PrometheusStatLogger | None,
        chat_template: str | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.model_names = list(model_names)
        self.limiter = limiter
        self.metrics = metrics
        self.chat_template = chat_template
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len

    # ---- checks ---------------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> str:
        """The model name for responses; 404 for a name this server does not serve."""
        if name is None or name in self.model_names:
            return self.model_names[0]
        raise OpenAIError(
            f"The model {name!r} does not exist: this server serves {', '.join(map(repr, self.model_names))} "
            "(see GET /v1/models).", 404, param="model", code="model_not_found",
        )

    @staticmethod
    def resolve_feature(body_feature: str | None, header_feature: str | None) -> str | None:
        """The feature tag: the X-Feature header, else metadata.feature in the body."""
        feature = header_feature if header_feature is not None else body_feature
        if feature is None:
            return None
        try:
            return check_feature(feature)
        except ValueError as e:
            param = "X-Feature" if header_feature is not None else "metadata.feature"
            raise bad_request(str(e), param=param) from None

    # ---- prompts --------------------------------------------------------------------------------------------
    def token_prompt(self, token_ids: list[int], param: str = "prompt") -> Prompt:
        try:
            self.engine.engine.validate_prompt(token_ids)
        except ValueError as e:
            raise bad_request(_context_message(str(e)), param=param) from None
        return Prompt(None, token_ids)

    def text_prompt(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> Prompt:
        token_ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        prompt = self.token_prompt(token_ids, param)
        prompt.text = text
        return prompt

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    template_kwargs: dict[str, Any] | None) -> str:
        conversation = []
        for message in messages:
            entry = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
            if message.name is not None:
                entry["name"] = message.name
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            conversation.append(entry)
        reserved = {"messages", "add_generation_prompt", "chat_template", "tools"} & set(template_kwargs or {})
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {sorted(reserved)}", param="chat_template_kwargs")
        try:
            return self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, chat_template=self.chat_template,
                **(template_kwargs or {}),
            )
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), param="messages") from None

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    template_kwargs: dict[str, Any] | None = None) -> Prompt:
        text = self.render_chat(messages, add_generation_prompt, template_kwargs)
        # The template writes the special tokens itself (as LLM.chat).
        return self.text_prompt(text, add_special_tokens=False, param="messages")

    # ---- sampling -------------------------------------------------------------------------------------------
    def resolve_max_tokens(self, prompt: Prompt, requested: int | None, default: int, param: str) -> int:
        num_prompt = len(prompt.token_ids)
        room = self.max_model_len - num_prompt
        limit = self.config.max_tokens_limit
        if requested is not None:
            if limit is not None and requested > limit:
                raise bad_request(
                    f"{param}={requested} is over this server's limit of {limit} tokens (--max-tokens-limit): "
                    f"ask for at most {limit}", param=param, code="max_tokens_over_limit",
                )
            if requested > room:
                raise bad_request(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                    f"{num_prompt + requested} tokens ({num_prompt} in the prompt, {requested} in the completion): "
                    f"lower {param} to at most {max(room, 0)} or shorten the prompt", param=param,
                    code="context_length_exceeded",
                )
            return requested
        if room < 1:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens and the prompt has "
                f"{num_prompt}, leaving no room for output: shorten the prompt", param="prompt",
                code="context_length_exceeded",
            )
        return max(1, min(default, room, limit or default))

    @staticmethod
    def sampling_params(request: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        def pick(value, default):
            return default if value is None else value

        try:
            return SamplingParams(
                n=pick(request.n, 1),
                presence_penalty=pick(request.presence_penalty, 0.0),
                frequency_penalty=pick(request.frequency_penalty, 0.0),
                repetition_penalty=pick(request.repetition_penalty, 1.0),
                temperature=pick(request.temperature, 1.0),
                top_p=pick(request.top_p, 1.0),
                top_k=pick(request.top_k, 0),
                min_p=pick(request.min_p, 0.0),
                seed=request.seed,
                stop=request.stop,
                stop_token_ids=request.stop_token_ids,
                ignore_eos=pick(request.ignore_eos, False),
                max_tokens=max_tokens,
                min_tokens=pick(request.min_tokens, 0),
                logprobs=logprobs,
                include_stop_str_in_output=pick(request.include_stop_str_in_output, False),
                skip_special_tokens=pick(request.skip_special_tokens, True),
            )
        except ValueError as e:
            message = str(e)
            raise bad_request(message, param=message.split(" ", 1)[0].strip("(")) from None

    # ---- admission ------------------------------------------------------------------------------------------
    def admit(self, api_key: ApiKey, feature: str | None, num_tokens: int) -> Reservation:
        """Queue and rate-limit checks, right before the request goes to the engine."""
        if not self.engine.is_running:
            raise unavailable("The engine is not running: the server is shutting down or failed.", "engine_dead")
        max_queue = self.config.max_queue_len
        if max_queue is not None and self.engine.num_waiting >= max_queue:
            self._rejected("queue_full")
            raise unavailable(
                f"The server is overloaded: the waiting queue is full ({max_queue} requests, --max-queue-len). "
                "Retry shortly.", "queue_full",
            )
        try:
            return self.limiter.acquire(api_key, feature, num_tokens)
        except OpenAIError:
            self._rejected("rate_limit")
            raise

    def _rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.record_rejected(reason)

    # ---- running requests -------------------------------------------------------------------------------------
    def generate(self, request_id: str, prompt: Prompt, params: SamplingParams, ctx: RequestContext,
                 feature: str | None) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(request_id, prompt.engine_input(), params, arrival_time=ctx.arrival_time,
                                    feature=feature)

    @staticmethod
    def usage(prompts: Sequence[Prompt], outputs: Sequence[RequestOutput | None]) -> UsageInfo:
        num_prompt = sum(len(p.token_ids) for p in prompts)
        num_output = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
        cached = sum(o.num_cached_tokens for o in outputs if o is not None)
        gpu_seconds = sum(o.metrics.compute_seconds for o in outputs if o is not None and o.metrics is not None)
        return UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_output, total_tokens=num_prompt + num_output,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached), gpu_seconds=gpu_seconds)


def _context_message(message: str) -> str:
    return message.replace("raise max_model_len", "raise --max-model-len on the server")


def engine_error(e: BaseException) -> OpenAIError:
    """The error of a request that failed inside the engine (not the client's fault, except bad prompts)."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, ValueError):
        return bad_request(str(e))
    if isinstance(e, EngineDeadError):
        return unavailable(f"The engine stopped before this request finished ({e}).", "engine_dead")
    if isinstance(e, EngineStepError):
        return OpenAIError(str(e), 500, code="engine_error")
    logger.exception("request failed", exc_info=e)
    return OpenAIError(f"internal error: {e!r}", 500, code="internal_error")


def error_event(error: OpenAIError) -> str:
    return sse(json.dumps(error.to_dict()))


async def merge_outputs(streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several engine streams as they come; closing this closes (aborts) them all."""
    if len(streams) == 1:
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as e:
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def unless_disconnected(raw_request: Request | None, work: Awaitable[T]) -> T:
    """Await work, cancelling it if the client disconnects first (so its requests are aborted)."""
    if raw_request is None:
        return await work
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await raw_request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task in done:
        return task.result()
    raise OpenAIError("the client disconnected", 499, type="client_disconnected")
