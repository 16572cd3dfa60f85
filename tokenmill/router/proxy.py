"""Forwarding a request to a backend chain with failover, and escalation on the cheap tier's answer.

Failover: a connect error, a 5xx, a broken connection or a timeout before the first byte moves the request to
another replica of the same backend, then down the route's fallback list. A 429 or 503 means "busy": another
replica is tried, the replica is not ejected, and if every one is busy the client gets the shortest Retry-After
seen. Other 4xx answers are the client's problem and are returned as they are. Nothing is replayed once bytes
have reached the client: a stream cut after that ends with an error event.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tokenmill.entrypoints.openai.errors import OpenAIError
from tokenmill.router.balancing import BalancingPolicy, Pool, Replica
from tokenmill.router.config import RouterConfig
from tokenmill.router.costs import Usage, cost_usd
from tokenmill.router.health import HealthMonitor
from tokenmill.router.metrics import RouterMetrics
from tokenmill.router.upstream import UpstreamPool, UpstreamResponse

logger = logging.getLogger("tokenmill.router")

# Failover reasons (the `reason` label of the failovers metric).
CONNECT_ERROR, TIMEOUT, HTTP_5XX, BUSY, BROKEN = "connect_error", "timeout", "http_5xx", "busy", "connection_error"


@dataclass
class Attempt:
    """One backend's answer (or the start of it, for a stream)."""

    backend: str
    replica: Replica
    model: str
    status: int
    started: float
    headers: dict[str, str]
    # Non-streaming: the whole body. Streaming: None (the events come from `events`).
    body: bytes | None = None
    response: httpx.Response | UpstreamResponse | None = None
    first_chunk: bytes = b""
    chunks: AsyncIterator[bytes] | None = None
    usage: Usage = field(default_factory=Usage)
    latency_s: float = 0.0
    ttft_s: float | None = None
    cost_usd: float | None = None
    finished: bool = False

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body or b"{}")


@dataclass
class Failure:
    """Every attempt of a chain failed: what the client gets."""

    error: OpenAIError


class Forwarder:
    def __init__(self, config: RouterConfig, pools: dict[str, Pool], policies: dict[str, BalancingPolicy],
                 health: HealthMonitor, metrics: RouterMetrics) -> None:
        self.config = config
        self.pools = pools
        self.policies = policies
        self.health = health
        self.metrics = metrics
        timeouts = config.timeouts
        self.timeout = httpx.Timeout(connect=timeouts.connect_s, read=timeouts.read_s, write=timeouts.read_s,
                                     pool=timeouts.read_s)
        # Idle connections are dropped before the backend drops them (tokenmill serve: 5 s), so a request is not
        # sent on a connection the backend is closing (that would read as a broken replica).
        self.client = httpx.AsyncClient(timeout=self.timeout, limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=256, keepalive_expiry=4.0))
        # Plain-HTTP backends not behind a proxy (local replicas) go through the lean client.
        self.upstream = UpstreamPool(timeouts.connect_s, timeouts.read_s, keepalive_expiry=4.0)
        self._targets: dict[str, tuple[str, int, str] | None] = {}

    async def close(self) -> None:
        self.upstream.close()
        await self.client.aclose()

    def _direct_target(self, url: str) -> tuple[str, int, str] | None:
        """(host, port, path) when url is plain HTTP reached without a proxy; None for httpx to handle."""
        if url not in self._targets:
            parsed = httpx.URL(url)
            direct = parsed.scheme == "http" and not parsed.query and not parsed.userinfo
            transport_for_url = getattr(self.client, "_transport_for_url", None)
            if direct and transport_for_url is not None:
                direct = transport_for_url(parsed) is self.client._transport
            self._targets[url] = ((parsed.host, parsed.port or 80, parsed.raw_path.decode("ascii"))
                                  if direct and transport_for_url is not None else None)
        return self._targets[url]

    # ---- one chain --------------------------------------------------------------------------------------------------
    async def send(self, route: str, backends: list[str], path: str, body: dict[str, Any], stream: bool,
                   headers: dict[str, str]) -> Attempt | Failure:
        """Send to the first backend replica that takes the request; Failure when none does."""
        retry_after: int | None = None
        tried: list[str] = []
        for backend in backends:
            pool = self.pools[backend]
            policy = self.policies[backend]
            excluded: list[Replica] = []
            while True:
                candidates = pool.healthy(exclude=excluded)
                if not candidates:
                    break
                replica = policy.choose(pool, candidates, body)
                excluded.append(replica)
                tried.append(f"{backend} {replica.url}")
                result = await self._attempt(pool, replica, path, body, stream, headers)
                if isinstance(result, Attempt):
                    return result
                reason, seconds = result
                self.metrics.failovers.labels(route, backend, reason).inc()
                if reason == BUSY:
                    retry_after = seconds if retry_after is None else min(retry_after, seconds)
        if retry_after is not None:
            return Failure(OpenAIError(
                f"Every backend of route {route!r} is busy: retry after {retry_after} s.", 503,
                code="backends_busy", headers={"Retry-After": str(retry_after)}))
        if not tried:
            interval = max(1, int(self.config.health.interval_s + 0.999))
            return Failure(OpenAIError(
                f"No healthy replica for route {route!r} (backends {backends}): retry shortly.", 503,
                code="no_healthy_backend", headers={"Retry-After": str(interval)}))
        return Failure(OpenAIError(
            f"No backend could answer route {route!r}; tried: {', '.join(tried)} (see the router log).", 502,
            type="bad_gateway", code="backends_failed"))

    async def _attempt(self, pool: Pool, replica: Replica, path: str, body: dict[str, Any], stream: bool,
                       headers: dict[str, str]) -> Attempt | tuple[str, int]:
        """An Attempt, or (failover reason, retry-after seconds) when another replica should be tried."""
        backend = pool.config
        payload = dict(body, model=backend.model, stream=stream)
        send_headers = dict(headers)
        if backend.api_key:
            send_headers["Authorization"] = f"Bearer {backend.api_key}"
        else:
            send_headers.pop("Authorization", None)
        started = time.perf_counter()
        replica.num_outstanding += 1
        replica.num_requests += 1
        self.metrics.backend_outstanding.labels(pool.name, replica.url).inc()
        response: httpx.Response | UpstreamResponse | None = None
        done = True
        try:
            target = self._direct_target(replica.url + path)
            if target is not None:
                send_headers["Content-Type"] = "application/json"
                response = await self.upstream.post(target[0], target[1], target[2], json.dumps(payload).encode(),
                                                    send_headers)
            else:
                request = self.client.build_request("POST", replica.url + path, json=payload, headers=send_headers)
                response = await self.client.send(request, stream=True)
            status = response.status_code
            if status in (429, 503):
                await response.aclose()
                return BUSY, _retry_after(response.headers.get("retry-after"))
            if status >= 500:
                await response.aclose()
                self.health.eject(replica, f"HTTP {status}")
                return HTTP_5XX, 0
            attempt = Attempt(pool.name, replica, backend.model, status, started, dict(response.headers))
            if not stream or status != 200:
                attempt.body = await response.aread()
                await response.aclose()
                self.finish(attempt, pool)
                return attempt
            # Wait for the first chunk before answering the client: until then failover is still possible.
            attempt.chunks = response.aiter_bytes()
            attempt.first_chunk = await attempt.chunks.__anext__()
            attempt.ttft_s = time.perf_counter() - started
            attempt.response = response
            done = False
            return attempt
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            self.health.eject(replica, f"connect: {type(e).__name__}")
            return CONNECT_ERROR, 0
        except httpx.TimeoutException:
            return TIMEOUT, 0
        except (httpx.HTTPError, StopAsyncIteration) as e:
            self.health.eject(replica, f"connection: {type(e).__name__}")
            return BROKEN, 0
        finally:
            if done:
                if response is not None and not response.is_closed:
                    await response.aclose()
                self._release(pool, replica)

    def _release(self, pool: Pool, replica: Replica) -> None:
        replica.num_outstanding -= 1
        self.metrics.backend_outstanding.labels(pool.name, replica.url).dec()

    def finish(self, attempt: Attempt, pool: Pool | None = None) -> None:
        """Account a finished attempt: latency, usage, cost."""
        attempt.finished = True
        attempt.latency_s = time.perf_counter() - attempt.started
        if attempt.ttft_s is None:
            attempt.ttft_s = attempt.latency_s
        self.metrics.latency.labels(attempt.backend).observe(attempt.latency_s)
        if attempt.body is not None and attempt.status == 200:
            try:
                attempt.usage = Usage.from_block(json.loads(attempt.body).get("usage"))
            except (json.JSONDecodeError, AttributeError):
                pass
        attempt.cost_usd = cost_usd(self.pools[attempt.backend].config.price, attempt.usage)

    async def stream_events(self, attempt: Attempt, keep_usage_chunk: bool,
                            on_done: Callable[[Attempt, str | None], None]) -> AsyncGenerator[bytes, None]:
        """The backend's SSE bytes, passed through event by event; the usage is read on the way.

        The usage-only last chunk (asked for by the router) is dropped unless the client asked for it. A backend
        failure mid-stream ends the stream with an error event. on_done(attempt, error) runs once, before the
        client gets the final `data: [DONE]` (so the request is logged by the time the client sees its end).
        """
        assert attempt.response is not None and attempt.chunks is not None
        iterator = attempt.chunks
        buffer = attempt.first_chunk
        try:
            while True:
                # Pass on every whole event in the buffer.
                out = []
                done = False
                while True:
                    end = buffer.find(b"\n\n")
                    if end < 0:
                        break
                    event, buffer = buffer[: end + 2], buffer[end + 2:]
                    if (b'"usage":{' in event or b'"usage": {' in event) and not self._read_usage(
                            attempt, event, keep_usage_chunk):
                        continue
                    out.append(event)
                    done = done or event.startswith(b"data: [DONE]")
                if done:
                    # The end: account the request, then let the client see it (nothing is read after [DONE]).
                    await self._close_stream(attempt, on_done, None)
                    yield b"".join(out)
                    return
                if out:
                    yield b"".join(out)
                try:
                    chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                buffer += chunk
            if buffer.strip():
                yield buffer
        except (httpx.HTTPError, OSError) as e:
            error = f"the backend {attempt.backend!r} failed mid-stream ({type(e).__name__}); the answer is incomplete"
            self.metrics.stream_errors.labels(attempt.backend).inc()
            self.health.eject(attempt.replica, f"mid-stream: {type(e).__name__}")
            await self._close_stream(attempt, on_done, error)
            payload = {"error": {"message": error, "type": "bad_gateway", "param": None, "code": "backend_stream_error"}}
            yield f"data: {json.dumps(payload)}\n\ndata: [DONE]\n\n".encode()
        finally:
            await self._close_stream(attempt, on_done, None)

    async def _close_stream(self, attempt: Attempt, on_done: Callable[[Attempt, str | None], None],
                            error: str | None) -> None:
        """Close the backend stream, release the replica and account the attempt (once)."""
        if attempt.finished:
            return
        attempt.finished = True
        if attempt.response is not None:
            await attempt.response.aclose()
        self._release(self.pools[attempt.backend], attempt.replica)
        self.finish(attempt)
        on_done(attempt, error)

    async def abandon(self, attempt: Attempt, on_done: Callable[[Attempt, str | None], None]) -> None:
        """Close a stream the client left before its first event was sent."""
        await self._close_stream(attempt, on_done, "the client went away before the stream started")

    @staticmethod
    def _read_usage(attempt: Attempt, event: bytes, keep_usage_chunk: bool) -> bool:
        """Read usage from one event; False when the event is the usage-only chunk the client did not ask for."""
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                try:
                    data = json.loads(line[5:])
                except json.JSONDecodeError:
                    return True
                if isinstance(data, dict) and isinstance(data.get("usage"), dict):
                    attempt.usage = Usage.from_block(data["usage"])
                    if not data.get("choices") and not keep_usage_chunk:
                        return False
        return True


def _retry_after(value: str | None) -> int:
    try:
        return max(1, int(float(value))) if value else 1
    except ValueError:
        return 1


def synthesize_stream(response: dict[str, Any], chat: bool, include_usage: bool) -> bytes:
    """A complete answer as server-sent events (a buffered stream on an escalating route)."""
    base = {"id": response.get("id"), "created": response.get("created", int(time.time())),
            "model": response.get("model"),
            "object": "chat.completion.chunk" if chat else "text_completion"}
    events = []
    for choice in response.get("choices") or []:
        if chat:
            message = choice.get("message") or {}
            delta = {"role": message.get("role", "assistant"), "content": message.get("content")}
            out = {"index": choice.get("index", 0), "delta": delta, "logprobs": choice.get("logprobs"),
                   "finish_reason": choice.get("finish_reason")}
        else:
            out = {"index": choice.get("index", 0), "text": choice.get("text", ""),
                   "logprobs": choice.get("logprobs"), "finish_reason": choice.get("finish_reason")}
        events.append(dict(base, choices=[out]))
    if include_usage:
        events.append(dict(base, choices=[], usage=response.get("usage")))
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"
