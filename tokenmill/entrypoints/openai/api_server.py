"""The HTTP server: thin routes, the guard middleware (API keys, loading/draining), error handlers, lifecycle.

Lifecycle: the port opens at once and /health answers 503 ("loading") while the engine loads in a thread; then
200. On SIGTERM (or Ctrl+C) /health and new requests get 503 ("draining"), requests in flight finish (at most
--shutdown-timeout seconds, then they are aborted), and the process exits 0. A second signal stops at once:
requests in flight are aborted (streams end with an error event, then [DONE]) and the exit status is 128 + the
signal number. A failed start-up (the engine or a stat logger could not be set up) is logged and exits 1.

Protection against one client hogging the server: request bodies over --max-request-body-bytes get 413 before
they are buffered (from Content-Length, or counted as a chunked body arrives); prompts are tokenized in worker
threads after a cheap length bound; a connection that does not send its headers within --header-read-timeout is
closed.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args

import h11
import uvicorn
from fastapi import APIRouter, Body, Depends, FastAPI, Header
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.entrypoints.openai.auth import Authenticator
from tokenmill.entrypoints.openai.errors import OpenAIError, unavailable
from tokenmill.entrypoints.openai.protocol import (
    TOKENIZE_CHAT,
    TOKENIZE_PROMPT,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from tokenmill.entrypoints.openai.protocol_embeddings import EmbeddingRequest, EmbeddingResponse
from tokenmill.entrypoints.openai.protocol_responses import (
    INPUT_ITEM_TAGS,
    ResponsesRequest,
    ResponsesResponse,
    ResponseStreamEvent,
    ResponseStreamEventType,
)
from tokenmill.entrypoints.openai.rate_limit import RateLimiter
from tokenmill.entrypoints.openai.server_config import ServerConfig, default_max_request_body_bytes
from tokenmill.entrypoints.openai.serving_chat import OpenAIServingChat
from tokenmill.entrypoints.openai.serving_completion import OpenAIServingCompletion
from tokenmill.entrypoints.openai.serving_embeddings import OpenAIServingEmbedding
from tokenmill.entrypoints.openai.serving_engine import QUEUE_TICKET_KEY, RequestContext, RequestQueue
from tokenmill.entrypoints.openai.serving_models import OpenAIServingModels
from tokenmill.entrypoints.openai.serving_responses import OpenAIServingResponses
from tokenmill.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from tokenmill.metrics.loggers import LoggingStatLogger
from tokenmill.metrics.prometheus import PrometheusStatLogger
from tokenmill.metrics.usage import UsageLogger

logger = logging.getLogger("tokenmill.server")

# Seconds between the engine's death and the server's exit: /health answers 503 meanwhile (load balancers and
# probes see the failure), and the streams that were running get their error events out.
ENGINE_DEAD_EXIT_DELAY_S = 1.0

# Paths that need an API key (when keys are configured) and a loaded, non-draining server.
GUARDED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


class ServerStatus(enum.Enum):
    """What /health reports: LOADING -> OK -> DRAINING; FAILED if start-up failed."""

    LOADING = "loading"
    OK = "ok"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ServerState:
    """Everything the routes use. The servings exist once the engine is loaded (status OK)."""

    config: ServerConfig
    engine_config: EngineConfig
    model_names: list[str]
    chat_template: str | None = None
    status: ServerStatus = ServerStatus.LOADING
    engine: AsyncLLMEngine | None = None
    completion: OpenAIServingCompletion | None = None
    chat: OpenAIServingChat | None = None
    tokenization: OpenAIServingTokenization | None = None
    models: OpenAIServingModels | None = None
    responses: OpenAIServingResponses | None = None
    embedding: OpenAIServingEmbedding | None = None
    authenticator: Authenticator = field(init=False)
    limiter: RateLimiter = field(init=False)
    metrics: PrometheusStatLogger = field(init=False)
    request_queue: RequestQueue = field(init=False)
    stats_logger: LoggingStatLogger = field(default_factory=LoggingStatLogger)
    server: uvicorn.Server | None = None
    # Largest request body accepted; known once the model's max_model_len is (until then, the flag or 1 MiB).
    max_request_body_bytes: int = field(init=False)
    # Set when a second signal stopped the server at once: 128 + the signal number.
    exit_code: int | None = None

    def __post_init__(self) -> None:
        self.authenticator = Authenticator(self.config.api_keys)
        self.limiter = RateLimiter(self.config.default_rate_limit, self.config.feature_rate_limits)
        self.metrics = PrometheusStatLogger(self.model_names[0], self.config.gpu_hourly_cost)
        self.request_queue = RequestQueue(self.config.max_queue_len)
        self.max_request_body_bytes = self.config.max_request_body_bytes or default_max_request_body_bytes(1)

    # ---- loading ------------------------------------------------------------------------------------------------
    async def load(self) -> None:
        """Load the engine and build the servings; any failure is logged and stops the server (exit status 1)."""
        try:
            await self._load()
        except Exception as e:
            # Configuration problems (bad path, bad value) read best as one line; anything else gets its traceback.
            logger.error("start-up failed: %s", e, exc_info=not isinstance(e, ValueError | OSError))
            self.status = ServerStatus.FAILED
            if self.server is not None:
                self.server.should_exit = True

    async def _load(self) -> None:
        from tokenmill.engine.llm_engine import LLMEngine
        from tokenmill.model.default_model import DEFAULT_MODEL_NAME

        stat_loggers: list = [self.metrics, self.stats_logger]
        if self.config.usage_log:
            stat_loggers.append(UsageLogger(self.config.usage_log, self.model_names[0], self.config.gpu_hourly_cost))
        tracer = None
        if self.config.otlp_traces_endpoint:
            from tokenmill.metrics.tracing import RequestTracer

            tracer = RequestTracer(self.config.otlp_traces_endpoint, gpu_hourly_cost=self.config.gpu_hourly_cost)
            stat_loggers.append(tracer)
        llm_engine = await asyncio.to_thread(LLMEngine, self.engine_config, False, self.config.engine_process)
        self.max_request_body_bytes = (self.config.max_request_body_bytes
                                       or default_max_request_body_bytes(llm_engine.max_model_len))
        self.engine = AsyncLLMEngine(llm_engine, stat_loggers)
        self.engine.on_dead(self.engine_died)
        self.engine.start()
        args = (self.engine, self.config, self.model_names, self.limiter, self.metrics, self.chat_template,
                self.request_queue)
        self.completion = OpenAIServingCompletion(*args)
        self.chat = OpenAIServingChat(*args)
        self.tokenization = OpenAIServingTokenization(*args)
        # The model as the user named it (as vLLM's root), never the converted copy in the cache.
        self.models = OpenAIServingModels(*args, model_root=self.engine_config.model.model or DEFAULT_MODEL_NAME)
        self.responses = OpenAIServingResponses(*args)
        self.embedding = OpenAIServingEmbedding(*args)
        # Every endpoint that runs engine requests: a span per request.
        for serving in (self.completion, self.chat, self.responses, self.embedding):
            serving.tracer = tracer
        if self.status == ServerStatus.LOADING:
            self.status = ServerStatus.OK
            stats = llm_engine.scheduler_stats
            num_tokens = stats.num_kv_blocks * stats.block_size
            max_len = llm_engine.max_model_len
            host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "localhost"
            logger.info(
                "Ready: model %r at http://%s:%d/v1 (KV cache %d blocks x %d = %d tokens; max_model_len %d; "
                "max concurrency at max_model_len %.2fx; engine %s)", self.model_names[0], host, self.port,
                stats.num_kv_blocks, stats.block_size, num_tokens, max_len, num_tokens / max_len,
                f"process pid {llm_engine.engine_core.proc.pid}" if llm_engine.multiprocess else "in-process",
            )

    @property
    def port(self) -> int:
        servers = getattr(self.server, "servers", None) or []
        for server in servers:
            for sock in server.sockets:
                return sock.getsockname()[1]
        return self.config.port

    # ---- stopping -----------------------------------------------------------------------------------------------
    def engine_died(self, error: BaseException) -> None:
        """The engine (its process) died: requests in flight have failed already; /health turns 503 now and the
        server exits with status 1 shortly after (a supervisor restarts it)."""
        logger.error("The engine died (%s): failing the requests in flight, then exiting", error)
        self.status = ServerStatus.FAILED
        asyncio.get_running_loop().call_later(ENGINE_DEAD_EXIT_DELAY_S, self._exit_after_engine_death)

    def _exit_after_engine_death(self) -> None:
        if self.server is not None:
            self.server.should_exit = True

    async def drain(self) -> None:
        """Refuse new requests, let the ones in flight finish (bounded), then stop the server."""
        if self.status != ServerStatus.FAILED:
            self.status = ServerStatus.DRAINING
        timeout = self.config.shutdown_timeout
        engine = self.engine
        in_flight = engine.num_in_flight if engine else 0
        logger.info("Shutting down: %d requests in flight get up to %g s to finish", in_flight, timeout)
        deadline = time.monotonic() + timeout
        while engine is not None and engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if engine is not None and engine.num_in_flight:
            num = engine.abort_all(unavailable("The server shut down before this request finished.", "shutdown"))
            logger.warning("Aborted %d requests still running after --shutdown-timeout %g s", num, timeout)
        if self.server is not None:
            self.server.should_exit = True

    def stop_now(self, signum: int) -> None:
        """A second signal: abort everything in flight (each reader gets an error), then stop."""
        if self.status != ServerStatus.FAILED:
            self.status = ServerStatus.DRAINING
        self.exit_code = 128 + signum
        num = 0
        if self.engine is not None:
            num = self.engine.abort_all(unavailable(
                "The server was stopped (a second shutdown signal) before this request finished.", "shutdown"))
        logger.warning("Second %s: stopping now, %d requests aborted", signal.Signals(signum).name, num)
        if self.server is not None:
            self.server.should_exit = True


class _Server(uvicorn.Server):
    """uvicorn's server with a draining first signal, an aborting second one and a forced third (no re-raised
    signal: the exit status comes from run_server)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._num_signals = 0

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        self._num_signals += 1
        if self._loop is None:
            self.should_exit = True
        elif self._num_signals == 1:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.state.drain()))
        elif self._num_signals == 2:
            self._loop.call_soon_threadsafe(self.state.stop_now, sig)
        else:
            self.force_exit = self.should_exit = True


def header_timeout_protocol(timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers do not arrive within timeout seconds
    (counted from the connection's start, or from the end of its previous response). uvicorn's keep-alive timeout
    stops once any byte arrives, so without this a client sending a header byte now and then holds a
    connection forever."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
                self._cancel_header_timer()
            elif self._header_timer is None:
                # A new cycle began within this data (e.g. after the rest of a refused body was discarded); the
                # deadline is not moved by bytes that leave the headers incomplete.
                self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(timeout, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            busy = self.cycle is not None and not self.cycle.response_complete
            if not busy and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.debug("closing a connection that sent no complete request headers in %g s", timeout)
                self.transport.close()

    return HeaderTimeoutH11Protocol


# ---- responses -----------------------------------------------------------------------------------------------------
class SSEResponse(StreamingResponse):
    """A server-sent-events stream; closes its generator however the response ends (so requests get aborted)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def error_response(error: OpenAIError) -> Response:
    # ASCII JSON: a message quoting the request (an unknown parameter's name) may hold a lone surrogate, which
    # has no UTF-8 encoding; as a \ud800 escape it is still valid JSON.
    return Response(json.dumps(error.to_dict()), status_code=error.status, headers=error.headers,
                    media_type="application/json")


def respond(result: Any) -> Response:
    if hasattr(result, "__aiter__"):
        return SSEResponse(result)
    return Response(content=result.model_dump_json(), media_type="application/json")


# ---- middleware ----------------------------------------------------------------------------------------------------
class GuardMiddleware:
    """Pure ASGI (no buffering of streams): API key check, then 503 while loading or draining. When the request
    ends, it gives back the waiting-queue slots the request still holds."""

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not scope["path"].startswith(GUARDED_PREFIXES):
            await self.app(scope, receive, send)
            return
        state = self.state
        try:
            authorization = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    authorization = value.decode("latin-1")
                    break
            try:
                api_key = state.authenticator.authenticate(authorization)
            except OpenAIError:
                state.metrics.record_rejected("auth")
                raise
            if state.status != ServerStatus.OK:
                state.metrics.record_rejected(state.status.value)
                raise _status_error(state.status)
        except OpenAIError as e:
            await error_response(e)(scope, receive, send)
            return
        scope_state = scope.setdefault("state", {})
        scope_state["api_key"] = api_key
        try:
            await self.app(scope, receive, send)
        finally:
            ticket = scope_state.pop(QUEUE_TICKET_KEY, None)
            if ticket is not None:
                ticket.release_all()


class _BodyTooLarge(StarletteHTTPException):
    """Raised from receive() while a body is read: FastAPI passes HTTP exceptions through to the error handlers."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=_body_too_large_message(limit))


def _body_too_large_message(limit: int) -> str:
    return (f"The request body is larger than this server accepts ({limit} bytes, --max-request-body-bytes): "
            "send a shorter prompt or fewer prompts per request")


class BodyLimitMiddleware:
    """413 in OpenAI's shape for a request body over the limit, without buffering it: at once from
    Content-Length, else (a chunked body) as soon as the bytes received pass the limit. The connection stays
    open: uvicorn discards the rest of the body as it arrives (never holding it), so the client, which usually
    sends the whole body before reading, gets the 413 instead of a broken pipe."""

    def __init__(self, app, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        content_length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                content_length = int(value) if value.isdigit() else None
                break
        if content_length is not None and content_length > limit:
            error = OpenAIError(_body_too_large_message(limit), 413, code="request_too_large")
            await error_response(error)(scope, receive, send)
            return
        num_received = 0

        async def limited_receive():
            nonlocal num_received
            message = await receive()
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > limit:
                    raise _BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


def _status_error(status: ServerStatus) -> OpenAIError:
    if status == ServerStatus.LOADING:
        return unavailable("The model is still loading: retry in a few seconds (GET /health turns 200).",
                           "model_loading", retry_after=5)
    if status == ServerStatus.DRAINING:
        return unavailable("The server is shutting down and takes no new requests: retry on another replica.",
                           "server_draining", retry_after=5)
    return unavailable("The engine failed (it did not load, or its process died): see the server log.",
                       "engine_failed", retry_after=60)


# ---- error handlers ------------------------------------------------------------------------------------------------
# Names pydantic puts in an error's location for the member of a union it tried (list members contain "[").
_UNION_MEMBER_NAMES = frozenset({
    "str", "int", "float", "bool", "dict", "list", "constrained-str", "constrained-int", "constrained-float",
    TOKENIZE_PROMPT, TOKENIZE_CHAT, *INPUT_ITEM_TAGS,
})


_UNION_FORMS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}


def _param(loc: tuple) -> str | None:
    """OpenAI's way of naming a parameter: messages.[0].content (union member names left out)."""
    parts = []
    for x in loc:
        if x == "body":
            continue
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif "[" not in x and x not in _UNION_MEMBER_NAMES:
            parts.append(x)
    return ".".join(parts) or None


def _is_type_error(err: dict) -> bool:
    return str(err.get("type", "")).endswith("_type")


def validation_error(exc: RequestValidationError) -> OpenAIError:
    """Pydantic's errors as one 400 in OpenAI's shape, naming the parameter."""
    errors = list(exc.errors())
    # For a union (content: str | list[part]), a specific check that failed says more than "not a string".
    specific = [_param(e.get("loc", ())) for e in errors if e.get("type") == "value_error"]
    errors = [
        e for e in errors
        if not (_is_type_error(e) and any(p and (_param(e.get("loc", ())) or "") in p for p in specific))
    ] or errors
    # Several type errors under one parameter: the value matched none of a union's forms; say it once.
    by_param: dict[str | None, list[dict]] = {}
    for err in errors:
        top = _param(err.get("loc", ())[:2])
        by_param.setdefault(top if top in _UNION_FORMS else _param(err.get("loc", ())), []).append(err)
    collapsed: list[dict[str, Any]] = []
    for top, group in by_param.items():
        if top is not None and len(group) > 1 and all(_is_type_error(e) for e in group):
            forms = _UNION_FORMS.get(top.rsplit(".", 1)[-1], "one of the types listed in GET /openapi.json")
            collapsed.append({"type": "union", "param": top,
                              "msg": f"must be {forms}, got {group[0].get('input')!r}"})
        else:
            # The value has the type of one union member and fails its range or content check: say only that.
            collapsed.extend([e for e in group if not _is_type_error(e)] or group)
    messages, params = [], []
    for err in collapsed:
        param = err["param"] if "param" in err else _param(err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        kind = err.get("type")
        if param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
            messages.append("The request body must be a JSON object, sent with 'Content-Type: application/json'")
        elif kind == "json_invalid":
            messages.append(f"The request body is not valid JSON ({err.get('ctx', {}).get('error', msg)}): "
                            "send a JSON object")
            param = None
        elif kind == "missing" and param is None:
            messages.append("The request body is missing: send a JSON object")
        elif kind == "string_unicode":
            # Without a location, the string was a key of the request object: a parameter name.
            messages.append(f"{param or 'A parameter name'} holds a lone UTF-16 surrogate, which is not valid "
                            "Unicode text: send surrogates only in pairs, or the character itself")
        elif kind == "string_too_short" and (err.get("ctx") or {}).get("min_length") == 1:
            messages.append(f"{param} must not be empty")
        elif kind == "extra_forbidden":
            messages.append(f"Unrecognized request argument supplied: {param} (tokenmill does not support it; "
                            "see GET /openapi.json for the accepted parameters)")
        elif kind in ("value_error", "union") or param is None:
            # Our own checks name the parameter themselves.
            messages.append(msg if param is None or msg.startswith(param.rsplit(".", 1)[-1]) else f"{param}: {msg}")
        elif "input" in err and kind != "missing":
            messages.append(f"{param}: {msg}, got {err['input']!r}")
        else:
            messages.append(f"{param}: {msg}")
        if param is not None:
            params.append(param)
    # The same problem reported for several union members reads once.
    unique = list(dict.fromkeys(messages))
    return OpenAIError("; ".join(unique[:5]), 400, param=params[0] if params else None, code="invalid_request")


def add_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"{request.method} {request.url.path} does not exist: see GET /openapi.json for the routes"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}: see GET /openapi.json"
        code = "request_too_large" if isinstance(exc, _BodyTooLarge) else None
        return error_response(OpenAIError(message, exc.status_code, code=code, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(OpenAIError(f"internal server error: {exc!r}", 500, code="internal_error"))


# ---- routes --------------------------------------------------------------------------------------------------------
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid request: malformed JSON, wrong types, out-of-range values, prompt too long"),
        (401, "Missing or invalid API key"),
        (404, "Unknown model"),
        (429, "Rate limit reached (see the Retry-After header)"),
        (503, "Loading, draining, or the waiting queue is full (see the Retry-After header)"),
    )
}


def _context(raw: Request, x_feature: str | None) -> RequestContext:
    return RequestContext(api_key=raw.scope["state"]["api_key"], feature_header=x_feature,
                          arrival_time=time.time(), raw_request=raw)


FeatureHeader = Annotated[str | None, Header(alias="X-Feature",
                                             description="Feature tag for rate limits and cost metering.")]


def build_router(state: ServerState) -> APIRouter:
    # Declared so /openapi.json shows the bearer scheme; the check itself is GuardMiddleware's.
    dependencies = [Depends(HTTPBearer(auto_error=False))] if state.authenticator.enabled else []
    api = APIRouter(dependencies=dependencies, responses=ERROR_RESPONSES)

    @api.post("/v1/completions", response_model=CompletionResponse, tags=["OpenAI"],
              summary="Create a completion (stream: true answers with server-sent CompletionStreamResponse events)")
    async def create_completion(body: CompletionRequest, raw: Request, x_feature: FeatureHeader = None):
        return respond(await state.completion.create_completion(body, _context(raw, x_feature)))

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["OpenAI"],
              summary="Create a chat completion (stream: true answers with server-sent "
                      "ChatCompletionStreamResponse events)")
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request, x_feature: FeatureHeader = None):
        return respond(await state.chat.create_chat_completion(body, _context(raw, x_feature)))

    @api.post("/v1/responses", response_model=ResponsesResponse, tags=["OpenAI"],
              summary="Create a model response (Responses API; stream: true answers with its semantic events)")
    async def create_response(body: ResponsesRequest, raw: Request, x_feature: FeatureHeader = None):
        return respond(await state.responses.create_response(body, _context(raw, x_feature)))

    @api.post("/v1/embeddings", response_model=EmbeddingResponse, tags=["OpenAI"],
              summary="Create embeddings: final hidden states pooled as --pooling-type says, L2-normalized")
    async def create_embedding(body: EmbeddingRequest, raw: Request, x_feature: FeatureHeader = None):
        return respond(await state.embedding.create_embedding(body, _context(raw, x_feature)))

    @api.get("/v1/models", response_model=ModelList, tags=["OpenAI"], summary="List the served model names")
    async def list_models():
        return respond(state.models.list_models())

    # {model:path}: model names contain "/" (HuggingFaceTB/SmolLM2-135M-Instruct).
    @api.get("/v1/models/{model:path}", response_model=ModelCard, tags=["OpenAI"], summary="Describe a served model")
    async def get_model(model: str):
        return respond(state.models.card(model))

    for prefix in ("", "/v1"):  # vLLM's paths, and the same under /v1 where OpenAI clients put everything
        @api.post(f"{prefix}/tokenize", response_model=TokenizeResponse, tags=["vLLM"],
                  summary="Token ids of a prompt, or of chat messages rendered with the chat template")
        async def tokenize(body: Annotated[TokenizeRequest, Body()]):
            return respond(await state.tokenization.tokenize(body))

        @api.post(f"{prefix}/detokenize", response_model=DetokenizeResponse, tags=["vLLM"],
                  summary="Text of token ids")
        async def detokenize(body: DetokenizeRequest):
            return respond(await state.tokenization.detokenize(body))

    return api


def build_open_router(state: ServerState) -> APIRouter:
    """Routes without API key: health and metrics (for load balancers and Prometheus)."""
    router = APIRouter()

    @router.get("/health", response_model=HealthResponse, tags=["Operations"],
                responses={503: {"model": HealthResponse, "description": "Loading, draining or failed"}},
                summary="200 when ready; 503 while loading or draining")
    async def health():
        return JSONResponse({"status": state.status.value}, status_code=200 if state.status == ServerStatus.OK else 503)

    @router.get("/live", response_model=HealthResponse, tags=["Operations"],
                responses={503: {"model": HealthResponse, "description": "The engine failed or its loop died"}},
                summary="Liveness: 200 while the process works, loading and draining included; 503 once the "
                        "engine failed or its loop died (restart the process)")
    async def live():
        status = state.status
        dead = status == ServerStatus.FAILED or (
            status == ServerStatus.OK and not (state.engine and state.engine.is_running))
        return JSONResponse({"status": status.value}, status_code=503 if dead else 200)

    @router.get("/metrics", tags=["Operations"], response_class=Response,
                responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
                summary="Prometheus metrics (vLLM's names, with a model_name label)")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @router.get("/version", tags=["Operations"], summary="tokenmill's version")
    async def version():
        import tokenmill

        return {"version": tokenmill.__version__}

    return router


def _sse_media_type(event_schema: str) -> dict:
    """An SSE stream in OpenAPI 3.1: the body is text (not one JSON object). Each event's data is one JSON object
    of event_schema, then [DONE]; 3.1 has no field for a stream's items (3.2's itemSchema), so the event schema
    goes in an extension, x-sse-event."""
    return _sse_content(event_schema, {}, "One JSON event, or the literal [DONE] that ends the stream",
                        f"Server-sent events (stream: true): one `data: {{...}}` line per {event_schema}, each "
                        "followed by a blank line, then `data: [DONE]`. An error after the response started "
                        "arrives as `data: {\"error\": {...}}` (ErrorResponse) before [DONE].")


def _responses_sse_media_type() -> dict:
    """The Responses API's stream: named events (`event: <type>`), each data one ResponseStreamEvent, no [DONE]."""
    event_types = list(get_args(ResponseStreamEventType))
    named = {"event": {"type": "string", "enum": event_types,
                       "description": "The event's type, the same as its data's type"}}
    return _sse_content("ResponseStreamEvent", named, "One JSON event (ResponseStreamEvent) of the type named",
                        "Server-sent events (stream: true): per event, an `event: <type>` line and a `data: {...}` "
                        "line holding one ResponseStreamEvent, then a blank line. The stream starts with "
                        "response.created and ends with response.completed, or response.incomplete when "
                        "max_output_tokens cut the output; there is no [DONE]. An error after the response "
                        "started arrives as an `error` event.")


def _sse_content(event_schema: str, extra_fields: dict, data_description: str, description: str) -> dict:
    event = {
        "type": "object",
        "required": [*extra_fields, "data"],
        "properties": {**extra_fields, "data": {
            "type": "string", "contentMediaType": "application/json",
            "contentSchema": {"$ref": f"#/components/schemas/{event_schema}"},
            "description": data_description,
        }},
    }
    return {"schema": {"type": "string", "description": description}, "x-sse-event": event}


def _openapi(app: FastAPI):
    """FastAPI's schema, corrected: validation errors are 400 (not 422) and streams are documented."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (CompletionStreamResponse, ChatCompletionStreamResponse, ResponseStreamEvent):
            defs = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in defs.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components[model.__name__] = defs
        streams = {"/v1/completions": _sse_media_type("CompletionStreamResponse"),
                   "/v1/chat/completions": _sse_media_type("ChatCompletionStreamResponse"),
                   "/v1/responses": _responses_sse_media_type()}
        for path, item in schema.get("paths", {}).items():
            for operation in item.values():
                responses = operation.get("responses", {})
                responses.pop("422", None)
                if path in streams:
                    responses["200"].setdefault("content", {})["text/event-stream"] = streams[path]
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
        return schema

    return openapi


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(state.load())
        stats_task = asyncio.create_task(_log_stats_periodically(state))
        try:
            yield
        finally:
            stats_task.cancel()
            loader.cancel()
            if state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown)

    import tokenmill

    # FastAPI's /docs loads Swagger UI from a CDN; this serves the same page with assets from the package, so it
    # works offline. No /redoc.
    app = FastAPIOffline(
        title="tokenmill OpenAI-compatible API", version=tokenmill.__version__, lifespan=lifespan,
        redoc_url=None, static_url="/docs-assets",
        description="OpenAI's /v1/completions, /v1/chat/completions and /v1/models, vLLM's /tokenize, "
                    "/detokenize and metrics. See docs/server.md.",
    )
    app.include_router(build_router(state))
    app.include_router(build_open_router(state))
    add_exception_handlers(app)
    # The last added runs first: CORS (answers preflights), then the guard (keys, status), then the body limit.
    app.add_middleware(BodyLimitMiddleware, limit=lambda: state.max_request_body_bytes)
    app.add_middleware(GuardMiddleware, state=state)
    config = state.config
    if config.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=list(config.allowed_methods), allow_headers=list(config.allowed_headers),
                           allow_credentials=config.allow_credentials)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    app.state.server_state = state
    return app


async def _log_stats_periodically(state: ServerState) -> None:
    interval = state.config.log_stats_interval
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        state.stats_logger.log()


def run_server(config: ServerConfig, engine_config: EngineConfig, model_names: list[str],
               chat_template: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT. Exit status: 0 after a clean drain, 1 if start-up failed, 128 + the signal
    number if a second signal stopped the server at once."""
    state = ServerState(config, engine_config, model_names, chat_template)
    app = build_app(state)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.uvicorn_log_level,
        access_log=not config.disable_uvicorn_access_log, lifespan="on", timeout_graceful_shutdown=5,
        timeout_keep_alive=5, http=header_timeout_protocol(config.header_read_timeout),
    )
    server = _Server(uv_config, state)
    state.server = server
    server.run()
    if state.exit_code is not None:
        if state.engine is not None:
            state.engine.engine.engine_core.kill()
        # Stopped by a second signal: leave now. The interpreter's native teardown after this point (thread
        # pools of the tensor and tokenizer libraries) takes seconds; logs and the usage log are flushed already.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(state.exit_code)
    return 1 if state.status == ServerStatus.FAILED else 0
