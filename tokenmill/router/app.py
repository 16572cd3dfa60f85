"""The router's HTTP server: the OpenAI API of `tokenmill serve`, in front of model tiers and replicas.

A request's path: API key -> feature tag -> route (feature, else model name, else "*") -> guardrails (max_tokens
cap, max input tokens, rate limits per key and feature) -> the route's backend chain with failover -> escalation
checks (routes with `escalate`) -> usage log, metrics, escalation log.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from tokenmill.entrypoints.openai.auth import Authenticator
from tokenmill.entrypoints.openai.errors import OpenAIError, bad_request
from tokenmill.entrypoints.openai.rate_limit import RateLimiter, Reservation
from tokenmill.entrypoints.openai.server_config import ApiKey, RateLimit, check_feature, load_api_keys_file
from tokenmill.router.balancing import Pool, Replica, make_policy
from tokenmill.router.checks import CheckFailure, needs_logprobs, run_checks
from tokenmill.router.config import RouteConfig, RouterConfig
from tokenmill.router.costs import cost_usd
from tokenmill.router.health import HealthMonitor
from tokenmill.router.logs import JsonLinesLog
from tokenmill.router.metrics import RouterMetrics, feature_label
from tokenmill.router.proxy import Attempt, Failure, Forwarder, synthesize_stream
from tokenmill.router.supervisor import Supervisor

logger = logging.getLogger("tokenmill.router")

# Response headers naming who answered.
BACKEND_HEADER = "X-Tokenmill-Backend"
ROUTE_HEADER = "X-Tokenmill-Route"
ESCALATED_HEADER = "X-Tokenmill-Escalated"
# Headers passed on to backends.
FORWARDED_HEADERS = ("x-request-id", "traceparent", "tracestate")


class SSEResponse(StreamingResponse):
    """A backend's stream passed on as server-sent events. However the response ends (a client that goes away,
    even before the first event), the backend stream is closed, the replica released and the request recorded."""

    def __init__(self, forwarder: Forwarder, attempt: Attempt, keep_usage_chunk: bool,
                 on_done: Callable[[Attempt, str | None], None], headers: dict[str, str]) -> None:
        self.events = forwarder.stream_events(attempt, keep_usage_chunk, on_done)
        super().__init__(self.events, media_type="text/event-stream", headers=headers)
        self.forwarder = forwarder
        self.attempt = attempt
        self.on_done = on_done

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()
            if not self.attempt.finished:  # the generator never started
                await self.forwarder.abandon(self.attempt, self.on_done)


@dataclass
class Call:
    """One client request as the router handles it."""

    request_id: str
    path: str
    chat: bool
    body: dict[str, Any]
    stream: bool
    include_usage: bool
    route: RouteConfig
    feature: str | None
    api_key: ApiKey
    reservation: Reservation
    started: float = field(default_factory=time.perf_counter)


class RouterState:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.supervisor = Supervisor(config, self.metrics)
        self.pools: dict[str, Pool] = {}
        for name, backend in config.backends.items():
            urls = self.supervisor.urls(name) if backend.launch else list(backend.urls)
            # Launched replicas start out of rotation: a probe admits each once it has loaded.
            self.pools[name] = Pool(backend, [Replica(name, url, healthy=backend.launch is None) for url in urls])
        self.policies = {name: make_policy(config.balancing) for name in self.pools}
        self.health = HealthMonitor(self.pools, config.health, self.metrics)
        self.forwarder = Forwarder(config, self.pools, self.policies, self.health, self.metrics)
        keys: list[ApiKey] = []
        feature_limits: dict[str, RateLimit] = {}
        if config.api_keys_file:
            keys, feature_limits = load_api_keys_file(config.api_keys_file)
        feature_limits.update(config.feature_rate_limits)
        self.authenticator = Authenticator(keys)
        self.limiter = RateLimiter(config.rate_limit, feature_limits)
        self.usage_log = JsonLinesLog(config.usage_log) if config.usage_log else None
        self.escalation_log = JsonLinesLog(config.escalation_log) if config.escalation_log else None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await self.supervisor.start()
        self._tasks.append(asyncio.create_task(self.health.run()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.forwarder.close()
        await self.supervisor.stop()
        for log in (self.usage_log, self.escalation_log):
            if log is not None:
                log.close()

    # ---- routing ----------------------------------------------------------------------------------------------------
    def resolve_route(self, feature: str | None, model: str | None) -> RouteConfig:
        routes = self.config.routes
        if feature is not None:
            for route in routes:
                if route.feature == feature:
                    return route
        if model is not None:
            for route in routes:
                if route.model == model:
                    return route
        for route in routes:
            if route.model == "*":
                return route
        listing = "; ".join(f"{r.name} ({'feature ' + r.feature if r.feature else 'model ' + str(r.model)})"
                            for r in routes)
        raise OpenAIError(
            f"No route matches feature {feature!r} and model {model!r}. Routes: {listing}.", 404,
            param="model", code="route_not_found")

    def model_names(self) -> list[str]:
        names = []
        for route in self.config.routes:
            name = route.model if route.model not in (None, "*") else self.config.backends[route.backend].model
            if name not in names:
                names.append(name)
        return names

    @property
    def healthy(self) -> bool:
        """Every route has a backend with a replica in rotation."""
        return all(any(self.pools[b].healthy() for b in (r.backend, *r.fallback)) for r in self.config.routes)

    # ---- guardrails -------------------------------------------------------------------------------------------------
    def _token_limited(self, key: ApiKey, feature: str | None) -> bool:
        limits = [key.rate_limit or self.limiter.default_limit]
        if feature is not None and feature in self.limiter.feature_limits:
            limits.append(self.limiter.feature_limits[feature])
        return any(limit.tokens_per_minute is not None for limit in limits)

    async def count_prompt_tokens(self, route: RouteConfig, body: dict[str, Any], chat: bool) -> int:
        """Prompt tokens by the route backend's /tokenize; a 4-characters-per-token estimate if it has none."""
        pool = self.pools[route.backend]
        if not chat:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return len(prompt)  # token ids
            if isinstance(prompt, list) and all(isinstance(p, list) for p in prompt):
                return sum(len(p) for p in prompt)
            if isinstance(prompt, list):
                return sum([await self.count_prompt_tokens(route, {"prompt": p}, False) for p in prompt])
        payload: dict[str, Any] = {"model": pool.config.model}
        if chat:
            payload["messages"] = body.get("messages")
        else:
            payload["prompt"] = body.get("prompt")
        headers = {"Authorization": f"Bearer {pool.config.api_key}"} if pool.config.api_key else {}
        for replica in pool.healthy():
            try:
                response = await self.forwarder.client.post(replica.root_url + "/tokenize", json=payload,
                                                            headers=headers)
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                data = response.json()
                return int(data.get("count", len(data.get("tokens", []))))
            if response.status_code == 400:
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = response.text
                raise bad_request(message, param="messages" if chat else "prompt")
            break
        text = json.dumps(payload.get("messages") if chat else payload.get("prompt"))
        return math.ceil(len(text) / 4)

    async def admit(self, raw: Request, path: str, chat: bool) -> Call:
        api_key = self.authenticator.authenticate(raw.headers.get("authorization"))
        try:
            body = json.loads(await raw.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"The request body is not valid JSON ({e}): send a JSON object",
                              code="invalid_request") from None
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object", code="invalid_request")
        header_feature = raw.headers.get("x-feature")
        metadata = body.get("metadata")
        body_feature = metadata.get("feature") if isinstance(metadata, dict) else None
        feature = header_feature if header_feature is not None else body_feature
        if feature is not None:
            try:
                check_feature(feature)
            except ValueError as e:
                raise bad_request(str(e), param="X-Feature" if header_feature is not None else "metadata.feature",
                                  code="invalid_feature") from None
        model = body.get("model")
        route = self.resolve_route(feature, model if isinstance(model, str) else None)
        stream = bool(body.get("stream"))
        options = body.get("stream_options")
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        # The hard max_tokens cap of the route.
        param = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        requested = body.get(param)
        if route.max_tokens is not None:
            if requested is None:
                body["max_tokens"] = route.max_tokens
            elif isinstance(requested, int) and not isinstance(requested, bool) and requested > route.max_tokens:
                raise bad_request(
                    f"{param}={requested} is over the limit of route {route.name!r} ({route.max_tokens} tokens): "
                    f"ask for at most {route.max_tokens}", param=param, code="max_tokens_over_limit")
        limit, choices = body.get(param), body.get("n")
        max_tokens: int = limit if isinstance(limit, int) else (1024 if chat else 16)
        n: int = choices if isinstance(choices, int) else 1
        num_prompt = 0
        if route.max_input_tokens is not None or self._token_limited(api_key, feature):
            num_prompt = await self.count_prompt_tokens(route, body, chat)
            if route.max_input_tokens is not None and num_prompt > route.max_input_tokens:
                raise bad_request(
                    f"the prompt has {num_prompt} tokens, over the limit of route {route.name!r} "
                    f"({route.max_input_tokens} tokens): shorten it", param="messages" if chat else "prompt",
                    code="input_too_long")
        reservation = self.limiter.acquire(api_key, feature, num_prompt + max_tokens * n)
        request_id = raw.headers.get("x-request-id") or f"rtr-{uuid.uuid4().hex}"
        return Call(request_id, path, chat, body, stream, include_usage, route, feature, api_key, reservation)

    # ---- answering --------------------------------------------------------------------------------------------------
    def _headers(self, call: Call) -> dict[str, str]:
        headers = {"X-Request-Id": call.request_id}
        if call.feature is not None:
            headers["X-Feature"] = call.feature
        return headers

    async def handle(self, raw: Request, path: str, chat: bool) -> Response:
        try:
            call = await self.admit(raw, path, chat)
        except OpenAIError as e:
            self.metrics.rejected.labels(e.code or str(e.status)).inc()
            return error_response(e)
        try:
            if call.route.escalate is not None:
                return await self._escalating(call)
            return await self._plain(call)
        except BaseException:
            self.limiter.settle(call.reservation, 0)
            raise

    async def _plain(self, call: Call) -> Response:
        route = call.route
        backends = [route.backend, *route.fallback]
        body = call.body
        if call.stream:
            body = dict(body, stream_options=dict(body.get("stream_options") or {}, include_usage=True))
        result = await self.forwarder.send(route.name, backends, call.path, body, call.stream, self._headers(call))
        if isinstance(result, Failure):
            return self._failed(call, result)
        if result.body is not None:
            self._record(call, final=result)
            return self._reply(call, result, result.body)

        def done(attempt: Attempt, error: str | None) -> None:
            self._record(call, final=attempt, error=error)

        return SSEResponse(self.forwarder, result, call.include_usage, done, self._response_headers(call, result))

    async def _escalating(self, call: Call) -> Response:
        route = call.route
        escalate = route.escalate
        assert escalate is not None
        # The cheap attempt is never streamed: its checks need the whole answer.
        cheap_body = copy.deepcopy(call.body)
        cheap_body.pop("stream_options", None)
        added_logprobs = False
        if needs_logprobs(escalate.when):
            if call.chat and not cheap_body.get("logprobs"):
                cheap_body["logprobs"], added_logprobs = True, True
            elif not call.chat and cheap_body.get("logprobs") is None:
                cheap_body["logprobs"], added_logprobs = 0, True
        cheap = await self.forwarder.send(route.name, [route.backend, *route.fallback], call.path, cheap_body,
                                          False, self._headers(call))
        failure: CheckFailure | None
        if isinstance(cheap, Failure):
            failure = CheckFailure("cheap_tier_error", cheap.error.message)
        elif cheap.status != 200:
            self._record(call, final=cheap)
            return self._reply(call, cheap, cheap.body or b"")
        else:
            response = cheap.json
            try:
                failure = run_checks(escalate.when, call.body, response)
            except Exception as e:  # a custom check that raises counts as a failed check
                logger.exception("escalation check raised on route %r", route.name)
                failure = CheckFailure("check_error", f"{type(e).__name__}: {e}")
            if failure is None:
                if added_logprobs:
                    for choice in response.get("choices") or []:
                        choice["logprobs"] = None
                self._record(call, final=cheap)
                if call.stream:
                    return Response(synthesize_stream(response, call.chat, call.include_usage),
                                    media_type="text/event-stream", headers=self._response_headers(call, cheap))
                return self._reply(call, cheap, json.dumps(response).encode())
        self.metrics.escalations.labels(route.name, failure.check).inc()
        cheap_attempt = cheap if isinstance(cheap, Attempt) else None
        body = call.body
        if call.stream:
            body = dict(body, stream_options=dict(body.get("stream_options") or {}, include_usage=True))
        strong = await self.forwarder.send(route.name, [escalate.to], call.path, body, call.stream,
                                           self._headers(call))
        if isinstance(strong, Failure):
            self._log_escalation(call, cheap_attempt, failure, None)
            return self._failed(call, strong, cheap=cheap_attempt)

        def done(attempt: Attempt, error: str | None) -> None:
            self._record(call, final=attempt, cheap=cheap_attempt, failure=failure, error=error)
            self._log_escalation(call, cheap_attempt, failure, attempt)

        if strong.body is not None:
            done(strong, None)
            return self._reply(call, strong, strong.body, escalated=True)
        return SSEResponse(self.forwarder, strong, call.include_usage, done,
                           self._response_headers(call, strong, escalated=True))

    def _response_headers(self, call: Call, attempt: Attempt, escalated: bool = False) -> dict[str, str]:
        headers = {BACKEND_HEADER: attempt.backend, ROUTE_HEADER: call.route.name, "X-Request-Id": call.request_id}
        if call.route.escalate is not None:
            headers[ESCALATED_HEADER] = "true" if escalated else "false"
        if call.stream:
            headers["Cache-Control"] = "no-cache"
        return headers

    def _reply(self, call: Call, attempt: Attempt, body: bytes, escalated: bool = False) -> Response:
        headers = self._response_headers(call, attempt, escalated)
        if attempt.status != 200:
            for name in ("retry-after", "www-authenticate"):
                if name in attempt.headers:
                    headers[name] = attempt.headers[name]
        return Response(body, status_code=attempt.status, headers=headers,
                        media_type=attempt.headers.get("content-type", "application/json"))

    def _failed(self, call: Call, failure: Failure, cheap: Attempt | None = None) -> Response:
        self.metrics.requests.labels(call.route.name, "none", str(failure.error.status)).inc()
        if cheap is not None and cheap.cost_usd:
            self.metrics.cost.labels(feature_label(call.feature), cheap.backend).inc(cheap.cost_usd)
        self.limiter.settle(call.reservation, 0)
        self._write_usage(call, None, cheap=cheap, status=failure.error.status, error=failure.error.message)
        return error_response(failure.error)

    # ---- accounting -------------------------------------------------------------------------------------------------
    def _strong_cost(self, call: Call, final: Attempt, cheap: Attempt | None) -> float | None:
        """What the answer would have cost on the route's escalation tier (its actual cost if it went there)."""
        escalate = call.route.escalate
        if escalate is None:
            return None
        if final.backend == escalate.to:
            return final.cost_usd
        return cost_usd(self.config.backends[escalate.to].price, final.usage)

    def _record(self, call: Call, *, final: Attempt, cheap: Attempt | None = None,
                failure: CheckFailure | None = None, error: str | None = None) -> None:
        route = call.route
        self.metrics.requests.labels(route.name, final.backend, str(final.status)).inc()
        feature = feature_label(call.feature)
        for attempt in (cheap, final):
            if attempt is not None and attempt.cost_usd:
                self.metrics.cost.labels(feature, attempt.backend).inc(attempt.cost_usd)
        self.limiter.settle(call.reservation, final.usage.input_tokens + final.usage.output_tokens)
        record = self._write_usage(call, final, cheap=cheap, status=final.status, error=error, failure=failure)
        if record.get("saved_usd") is not None:
            self.metrics.saved.labels(feature).inc(record["saved_usd"])

    def _write_usage(self, call: Call, final: Attempt | None, *, cheap: Attempt | None, status: int,
                     error: str | None = None, failure: CheckFailure | None = None) -> dict[str, Any]:
        costs = [a.cost_usd for a in (cheap, final) if a is not None and a.cost_usd is not None]
        total = sum(costs) if costs else None
        strong = self._strong_cost(call, final, cheap) if final is not None and final.status == 200 else None
        record = {
            "request_id": call.request_id,
            "time": time.time(),
            "feature": call.feature,
            "route": call.route.name,
            "api_key": call.api_key.name,
            "status": status,
            "stream": call.stream,
            "backend": final.backend if final else None,
            "replica": final.replica.url if final else None,
            "model": final.model if final else None,
            "input_tokens": final.usage.input_tokens if final else 0,
            "output_tokens": final.usage.output_tokens if final else 0,
            "gpu_seconds": final.usage.gpu_seconds if final else None,
            "ttft_s": final.ttft_s if final else None,
            "latency_s": time.perf_counter() - call.started,
            "cost_usd": total,
            "escalated": failure is not None,
            "escalation_reason": failure.check if failure else None,
            "strong_cost_usd": strong,
            "saved_usd": (strong - total) if strong is not None and total is not None else None,
            "error": error,
        }
        if self.usage_log is not None:
            self.usage_log.write(record)
        return record

    def _log_escalation(self, call: Call, cheap: Attempt | None, failure: CheckFailure,
                        strong: Attempt | None) -> None:
        if self.escalation_log is None:
            return

        def side(attempt: Attempt | None, with_output: bool) -> dict[str, Any] | None:
            if attempt is None:
                return None
            out = {"backend": attempt.backend, "model": attempt.model, "input_tokens": attempt.usage.input_tokens,
                   "output_tokens": attempt.usage.output_tokens, "gpu_seconds": attempt.usage.gpu_seconds,
                   "latency_s": attempt.latency_s, "cost_usd": attempt.cost_usd}
            if with_output and self.config.log_outputs:
                try:
                    choices = json.loads(attempt.body or b"{}").get("choices") or []
                except json.JSONDecodeError:
                    choices = []
                from tokenmill.router.checks import choice_text

                text = "\n".join(choice_text(c) for c in choices)
                out["output"] = text[: self.config.max_output_chars]
            return out

        cheap_cost = cheap.cost_usd if cheap is not None else None
        strong_cost = strong.cost_usd if strong is not None else None
        self.escalation_log.write({
            "request_id": call.request_id,
            "time": time.time(),
            "feature": call.feature,
            "route": call.route.name,
            "cheap": side(cheap, True),
            "reason": failure.to_dict(),
            "escalated": side(strong, False),
            "cost_delta_usd": (strong_cost - (cheap_cost or 0.0)) if strong_cost is not None else None,
        })


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status, headers=error.headers)


def build_app(state: RouterState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    import tokenmill

    app = FastAPI(title="tokenmill router", version=tokenmill.__version__, lifespan=lifespan,
                  description="One OpenAI endpoint over model tiers and replicas. See docs/router.md.")

    @app.post("/v1/chat/completions", tags=["OpenAI"], summary="Create a chat completion (routed)")
    async def chat_completions(raw: Request):
        return await state.handle(raw, "/chat/completions", chat=True)

    @app.post("/v1/completions", tags=["OpenAI"], summary="Create a completion (routed)")
    async def completions(raw: Request):
        return await state.handle(raw, "/completions", chat=False)

    @app.get("/v1/models", tags=["OpenAI"], summary="The routes' model names")
    async def models(raw: Request):
        try:
            state.authenticator.authenticate(raw.headers.get("authorization"))
        except OpenAIError as e:
            return error_response(e)
        now = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": now, "owned_by": "tokenmill"}
                                           for name in state.model_names()]}

    @app.get("/health", tags=["Operations"], summary="200 when every route has a replica in rotation")
    async def health():
        backends = {name: [{"url": r.url, "healthy": r.healthy, "outstanding": r.num_outstanding,
                            "requests": r.num_requests, "error": r.last_error,
                            **({"pid": state.supervisor.pid(r.url)} if pool.config.launch else {})}
                           for r in pool.replicas] for name, pool in state.pools.items()}
        ok = state.healthy
        return JSONResponse({"status": "ok" if ok else "degraded", "backends": backends},
                            status_code=200 if ok else 503)

    @app.get("/metrics", tags=["Operations"], summary="Prometheus metrics of the router")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"{request.method} {request.url.path} does not exist: see GET /openapi.json for the routes"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}: see GET /openapi.json"
        return error_response(OpenAIError(message, exc.status_code))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(OpenAIError(f"internal router error: {exc!r}", 500, code="internal_error"))

    app.state.router_state = state
    return app


class _Server(uvicorn.Server):
    """uvicorn's server; a SIGTERM/SIGINT stops it cleanly (launched replicas stopped) and exits 0."""

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


def run_router(config: RouterConfig) -> int:
    # One line per health probe would drown the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    state = RouterState(config)
    app = build_app(state)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level="info", access_log=False,
                               lifespan="on", timeout_graceful_shutdown=5, timeout_keep_alive=30)
    _Server(uv_config).run()
    return 0
