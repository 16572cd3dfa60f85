"""What every endpoint shares: model names, prompts, max_tokens, SamplingParams, admission, SSE framing.

Prompts are rendered and tokenized in a worker thread, never on the event loop: a long prompt must not stall
/health or the other streams. A cheap length bound runs first, so text that cannot fit max_model_len is refused
without being tokenized at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request

from tokenmill.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineStepError
from tokenmill.entrypoints.openai.errors import OpenAIError, bad_request, unavailable
from tokenmill.entrypoints.openai.protocol import ChatMessage, PromptTokensDetails, SamplingFields, UsageInfo
from tokenmill.entrypoints.openai.rate_limit import RateLimiter, Reservation
from tokenmill.entrypoints.openai.server_config import ApiKey, ServerConfig, check_feature
from tokenmill.entrypoints.openai.structured_outputs import structured_outputs_params
from tokenmill.metrics.prometheus import PrometheusStatLogger
from tokenmill.metrics.tracing import RequestTracer, operation_name
from tokenmill.outputs import EmbeddingRequestOutput, RequestOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.entrypoints.openai.protocol_responses import ResponsesRequest

logger = logging.getLogger("tokenmill.server")

T = TypeVar("T")
OutputT = TypeVar("OutputT", RequestOutput, EmbeddingRequestOutput)

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
    # The waiting-queue slots this request holds (reserve_queue); given back when its engine requests start.
    queue_ticket: QueueTicket | None = None


# Key of the QueueTicket in the ASGI scope's state: the middleware gives back what a request still holds when it ends.
QUEUE_TICKET_KEY = "queue_ticket"


class RequestQueue:
    """The engine's waiting queue as admission sees it (--max-queue-len), counted on the event loop.

    A request takes its slots synchronously when it arrives, before its first await (prompt tokenization runs in
    a thread), so a burst of simultaneous requests cannot all pass one check before any is counted. A slot is
    given back when its engine request produces the first output (it is running then, not waiting) or when the
    HTTP request ends, whichever comes first.
    """

    def __init__(self, max_len: int | None) -> None:
        self.max_len = max_len
        # Slots held: engine requests admitted that have not started running.
        self.num_waiting = 0

    def reserve(self, num: int, param: str = "prompt") -> QueueTicket:
        max_len = self.max_len
        if max_len is not None and num > max_len:
            raise bad_request(
                f"This request has {num} prompts ({param}), more than the server's waiting queue holds ({max_len}, "
                "--max-queue-len): send fewer per request", param=param,
            )
        if max_len is not None and self.num_waiting + num > max_len:
            raise unavailable(
                f"The server is overloaded: the waiting queue is full ({max_len} requests, --max-queue-len). "
                "Retry shortly.", "queue_full",
            )
        self.num_waiting += num
        return QueueTicket(self, num)


class QueueTicket:
    """Slots one HTTP request holds in the RequestQueue; release() is idempotent past zero."""

    __slots__ = ("_queue", "num_held")

    def __init__(self, queue: RequestQueue, num: int) -> None:
        self._queue = queue
        self.num_held = num

    def release(self, num: int = 1) -> None:
        num = min(num, self.num_held)
        self.num_held -= num
        self._queue.num_waiting -= num

    def release_all(self) -> None:
        self.release(self.num_held)


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
    # Set by the server when --otlp-traces-endpoint is given: a span per request.
    tracer: RequestTracer | None = None

    def __init__(
        self,
        engine: AsyncLLMEngine,
        config: ServerConfig,
        model_names: Sequence[str],
        limiter: RateLimiter,
        metrics: PrometheusStatLogger | None,
        chat_template: str | None = None,
        request_queue: RequestQueue | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.model_names = list(model_names)
        self.limiter = limiter
        self.metrics = metrics
        self.chat_template = chat_template
        # Shared by every endpoint of one server (one waiting queue).
        self.request_queue = request_queue if request_queue is not None else RequestQueue(config.max_queue_len)
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        # Text longer than this cannot fit max_model_len tokens (each token stands for at most
        # max_token_chars characters): refused before tokenization.
        self.max_prompt_chars = self.max_model_len * max_token_chars(self.tokenizer)
        # Rendering and tokenizing prompts; a few threads, so a burst of long prompts queues here.
        self._prompt_executor = _prompt_executor()

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
    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the prompt worker threads (rendering and tokenization stay off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._prompt_executor, fn, *args)

    def token_prompt(self, token_ids: list[int], param: str = "prompt") -> Prompt:
        try:
            self.engine.engine.validate_prompt(token_ids)
        except ValueError as e:
            code = "context_length_exceeded" if len(token_ids) > self.max_model_len else None
            raise bad_request(_context_message(str(e)), param=param, code=code) from None
        return Prompt(None, token_ids)

    def check_prompt_length(self, text: str, param: str = "prompt") -> None:
        """Refuse text that cannot fit max_model_len tokens, without tokenizing it."""
        if len(text) > self.max_prompt_chars:
            raise bad_request(
                f"{param} has {len(text)} characters, more than {self.max_model_len} tokens (this model's maximum "
                f"context length) can hold: shorten the prompt, or raise --max-model-len on the server",
                param=param, code="context_length_exceeded",
            )

    def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """Token ids of text; call from a worker thread (in_thread)."""
        self.check_prompt_length(text, param)
        try:
            return encode_releasing_gil(self.tokenizer, text, add_special_tokens)
        except (TypeError, ValueError, UnicodeError) as e:  # text the tokenizer cannot encode
            raise bad_request(f"{param} cannot be tokenized: {e}", param=param) from None

    def text_prompt(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> Prompt:
        """Call from a worker thread (in_thread)."""
        prompt = self.token_prompt(self.encode(text, add_special_tokens, param), param)
        prompt.text = text
        return prompt

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    template_kwargs: dict[str, Any] | None, param: str = "messages",
                    tools: list[dict[str, Any]] | None = None) -> str:
        conversation = []
        for message in messages:
            # content "" (not absent) for an assistant message with only tool_calls: templates that do not know
            # tool calls still render it, and those that do test `if message.content`.
            entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                     "content": message.text()}
            if message.name is not None:
                entry["name"] = message.name
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            if message.tool_calls:
                entry["tool_calls"] = [_template_tool_call(call.model_dump()) for call in message.tool_calls]
            conversation.append(entry)
        reserved = {"messages", "add_generation_prompt", "chat_template", "tools"} & set(template_kwargs or {})
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {sorted(reserved)}", param="chat_template_kwargs")
        # The template adds little around the messages: their own text must already fit.
        self.check_prompt_length("".join(entry["content"] for entry in conversation), param)
        try:
            return self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, chat_template=self.chat_template,
                tools=tools, **(template_kwargs or {}),
            )
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), param=param) from None

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    template_kwargs: dict[str, Any] | None = None, param: str = "messages",
                    tools: list[dict[str, Any]] | None = None) -> Prompt:
        """Call from a worker thread (in_thread). param names the messages in errors (Responses: input); tools
        (OpenAI's shape) go to the chat template."""
        text = self.render_chat(messages, add_generation_prompt, template_kwargs, param, tools)
        # The template writes the special tokens itself (as LLM.chat).
        return self.text_prompt(text, add_special_tokens=False, param=param)

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
    def sampling_params(request: SamplingFields | ResponsesRequest, max_tokens: int, logprobs: int | None
                        ) -> SamplingParams:
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
                structured_outputs=structured_outputs_params(request),
            )
        except ValueError as e:
            message = str(e)
            raise bad_request(message, param=message.split(" ", 1)[0].strip("(")) from None

    # ---- admission ------------------------------------------------------------------------------------------
    def reserve_queue(self, ctx: RequestContext, num_requests: int = 1, param: str = "prompt") -> None:
        """Take num_requests waiting-queue slots (503 queue_full when the queue is full). Call first, before any
        await; generate() and pool() give each slot back when its engine request starts (pool(): when it is
        done), the server when the request ends. param names the prompts when they alone overflow the queue."""
        if not self.engine.is_running:
            raise unavailable("The engine is not running: the server is shutting down or failed.", "engine_dead")
        try:
            ticket = self.request_queue.reserve(num_requests, param)
        except OpenAIError as e:
            if e.status == 503:
                self._rejected("queue_full")
            raise
        ctx.queue_ticket = ticket
        if ctx.raw_request is not None:
            ctx.raw_request.scope.setdefault("state", {})[QUEUE_TICKET_KEY] = ticket

    def check_num_prompts(self, num_prompts: int, n: int, param: str = "prompt") -> None:
        """The per-request caps: prompts (--max-prompts-per-request) and choices, n x prompts
        (--max-choices-per-request). param names the prompts (embeddings: input)."""
        max_prompts = self.config.max_prompts_per_request
        if num_prompts > max_prompts:
            raise bad_request(
                f"{param} is a list of {num_prompts} prompts, more than this server takes in one request "
                f"({max_prompts}, --max-prompts-per-request): split it into several requests", param=param,
            )
        max_choices = self.config.max_choices_per_request
        if num_prompts * n > max_choices:
            raise bad_request(
                f"n={n} for {num_prompts} prompt(s) asks for {num_prompts * n} choices, more than this server "
                f"generates for one request ({max_choices}, --max-choices-per-request): lower n or send fewer "
                "prompts", param="n",
            )

    def admit(self, api_key: ApiKey, feature: str | None, num_tokens: int) -> Reservation:
        """Rate-limit checks, right before the request goes to the engine (the queue slot is taken earlier)."""
        if not self.engine.is_running:
            raise unavailable("The engine is not running: the server is shutting down or failed.", "engine_dead")
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
        self._trace(request_id, ctx, params.max_tokens, params.temperature, params.top_p)
        stream = self.engine.generate(request_id, prompt.engine_input(), params, arrival_time=ctx.arrival_time,
                                      feature=feature)
        return _leave_queue_on_start(stream, ctx.queue_ticket) if ctx.queue_ticket is not None else stream

    def pool(self, request_id: str, prompt: Prompt, params: PoolingParams, ctx: RequestContext,
             feature: str | None) -> AsyncIterator[EmbeddingRequestOutput]:
        """A pooling (embedding) request: as generate(); its one output comes when it is done."""
        self._trace(request_id, ctx, None, None, None)
        stream = self.engine.encode(request_id, prompt.engine_input(), params, arrival_time=ctx.arrival_time,
                                    feature=feature)
        return _leave_queue_on_start(stream, ctx.queue_ticket) if ctx.queue_ticket is not None else stream

    def _trace(self, request_id: str, ctx: RequestContext, max_tokens: int | None, temperature: float | None,
               top_p: float | None) -> None:
        """Register the request with the tracer (a span when the engine finishes it), if tracing is on."""
        if self.tracer is None:
            return
        raw = ctx.raw_request
        self.tracer.start(request_id, raw.headers if raw is not None else {},
                          operation_name(raw.url.path if raw is not None else ""), self.model_names[0],
                          max_tokens, temperature, top_p)

    @staticmethod
    def usage(prompts: Sequence[Prompt], outputs: Sequence[RequestOutput | None]) -> UsageInfo:
        num_prompt = sum(len(p.token_ids) for p in prompts)
        num_output = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
        cached = sum(o.num_cached_tokens for o in outputs if o is not None)
        gpu_seconds = sum(o.metrics.compute_seconds for o in outputs if o is not None and o.metrics is not None)
        return UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_output, total_tokens=num_prompt + num_output,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached), gpu_seconds=gpu_seconds)


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool call for the chat template: arguments as a dict when they are a JSON object
    (templates write `tool_call.arguments | tojson`, as transformers' examples pass them), else the text."""
    function = dict(call["function"])
    try:
        arguments = json.loads(function["arguments"])
    except (TypeError, ValueError):
        arguments = None
    if isinstance(arguments, dict):
        function["arguments"] = arguments
    return {**call, "function": function}


async def first_output_or_error(raw_request: Request | None, stream: AsyncIterator[RequestOutput]
                                 ) -> AsyncIterator[RequestOutput]:
    """Wait for a stream's first output and return a stream that yields it and the rest. A request the engine
    fails before its first token (a grammar that does not compile, or compiles past the timeout) raises here,
    so a streamed request gets the error's status (400) instead of an error event in a started stream."""
    try:
        first = await unless_disconnected(raw_request, anext(stream))
    except StopAsyncIteration:
        first = None
    except OpenAIError:
        await stream.aclose()  # type: ignore[attr-defined]
        raise
    except Exception as e:
        await stream.aclose()  # type: ignore[attr-defined]
        raise engine_error(e) from None

    async def chained() -> AsyncIterator[RequestOutput]:
        try:
            if first is not None:
                yield first
                async for output in stream:
                    yield output
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    return chained()


async def _leave_queue_on_start(stream: AsyncIterator[OutputT], ticket: QueueTicket) -> AsyncIterator[OutputT]:
    """The engine stream; its waiting-queue slot is given back at the first output (or when it ends)."""
    released = False
    try:
        async for output in stream:
            if not released:
                released = True
                ticket.release()
            yield output
    finally:
        if not released:
            ticket.release()
        await stream.aclose()  # type: ignore[attr-defined]


def _prompt_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenmill-prompt")


def max_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token stands for: the longest token text in the vocabulary (a
    byte-level BPE token's text has one character per byte, so it bounds the decoded characters too), doubled
    against normalizers that shorten text, and at least 16."""
    backend = getattr(tokenizer, "backend", None)
    longest = 0
    if backend is not None and hasattr(backend, "get_vocab"):
        longest = max((len(token) for token in backend.get_vocab(with_added_tokens=True)), default=0)
    return max(16, 2 * longest)


def encode_releasing_gil(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """tokenizer.encode(text), letting other threads (the event loop) run meanwhile.

    The Rust tokenizer's encode() holds the GIL for the whole call, so even in a worker thread a long prompt
    stalls the event loop; encode_batch() releases it while it works, and gives the same ids.
    """
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if not isinstance(text, str):
        raise TypeError(f"encode() takes a str, got {type(text).__name__}")
    return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


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


async def merge_outputs(streams: Sequence[AsyncIterator[RequestOutput]]
                        ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
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


async def final_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The finished output of one engine stream (engine errors as OpenAI errors); closing aborts the request."""
    last = None
    try:
        async with contextlib.aclosing(merge_outputs([stream])) as outputs:
            async for _, output in outputs:
                last = output
    except Exception as e:
        raise engine_error(e) from None
    assert last is not None and last.finished
    return last


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
