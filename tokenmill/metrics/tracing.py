"""OpenTelemetry traces (--otlp-traces-endpoint): one span per request, exported over OTLP/HTTP (protobuf).

The server registers each request as it goes to the engine (start(): the incoming W3C ``traceparent``, the
sampling parameters, the operation), and the span is written when the engine reports the request finished
(record(), on the engine thread, from the same FinishedRequestStats as the usage log). So a router's span and
the engine's span share one trace, and the span carries what the usage record carries: tokens, feature,
gpu_seconds and cost_usd, queue time and TTFT.

Attributes follow the OpenTelemetry GenAI semantic conventions (gen_ai.*), plus tokenmill's own (tokenmill.*):

    gen_ai.operation.name          "chat" (/v1/chat/completions, /v1/responses), "text_completion" or "embeddings"
    gen_ai.system                  "tokenmill"
    gen_ai.request.model           the served model name
    gen_ai.request.max_tokens / temperature / top_p
    gen_ai.response.id             the request id
    gen_ai.response.finish_reasons ["stop"], ["length"] or ["abort"]
    gen_ai.usage.input_tokens / output_tokens
    tokenmill.feature              the X-Feature tag ("untagged" when none)
    tokenmill.gpu_seconds / tokenmill.cost_usd
    tokenmill.queue_time_s / tokenmill.ttft_s / tokenmill.e2e_s
    tokenmill.cached_tokens        prompt tokens served from the prefix cache

The span starts at the request's arrival and ends when it finished; an aborted request's span has an error
status. The exporter batches spans (BatchSpanProcessor, OTEL_BSP_* environment variables apply) and flushes
them at shutdown.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tokenmill.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats, StatLogger

logger = logging.getLogger("tokenmill.tracing")

SYSTEM = "tokenmill"
# Requests registered but never finished by the engine (refused before it started them) are forgotten
# oldest-first past this many, so the map cannot grow without bound.
MAX_PENDING = 65536

INSTALL_HINT = 'pip install "tokenmill[otel]"'


def otel_available() -> bool:
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


def check_otel_installed(flag: str = "--otlp-traces-endpoint") -> None:
    """Raise ValueError with the fix when the OpenTelemetry SDK or its OTLP exporter is missing."""
    if not otel_available():
        raise ValueError(
            f"{flag} needs the OpenTelemetry SDK and its OTLP/HTTP exporter, which are not installed: "
            f"run {INSTALL_HINT} (opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http)"
        )


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: a bare collector address (http://host:4318) gets OTLP's /v1/traces path."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"--otlp-traces-endpoint {endpoint!r} is not an http(s) URL: give the collector's OTLP/HTTP address, "
            "e.g. http://otel-collector:4318 (spans go to /v1/traces) or a full .../v1/traces URL"
        )
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


@dataclass
class _Pending:
    """What the server knows about a request when it goes to the engine."""

    parent: Any  # opentelemetry Context carrying the incoming traceparent (empty: a new trace)
    operation: str
    model: str
    max_tokens: int | None
    temperature: float | None
    top_p: float | None


def operation_name(path: str) -> str:
    """GenAI operation name of an HTTP route."""
    path = path.rstrip("/")
    if path.endswith(("/chat/completions", "/responses")):
        return "chat"
    if path.endswith("/embeddings"):
        return "embeddings"
    return "text_completion"


class RequestTracer(StatLogger):
    """Writes one span per finished request to an OTLP/HTTP endpoint (a StatLogger beside the usage log)."""

    def __init__(self, endpoint: str, service_name: str = "tokenmill", gpu_hourly_cost: float = 0.0,
                 exporter: Any = None) -> None:
        check_otel_installed()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=traces_url(endpoint))
        import tokenmill

        resource = Resource.create({"service.name": service_name, "service.version": tokenmill.__version__})
        # Our own provider (not the global one): several servers in one process, and no surprise for an
        # application that configured OpenTelemetry itself.
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("tokenmill", tokenmill.__version__)
        self.propagator = TraceContextTextMapPropagator()
        self.gpu_hourly_cost = gpu_hourly_cost
        # request_id -> _Pending; written by the event loop, read by the engine thread.
        self._pending: collections.OrderedDict[str, _Pending] = collections.OrderedDict()
        self._lock = threading.Lock()

    # ---- the server side ------------------------------------------------------------------------------------
    def start(self, request_id: str, headers: Mapping[str, str], operation: str, model: str,
              max_tokens: int | None, temperature: float | None, top_p: float | None) -> None:
        """Register a request about to go to the engine; headers may carry a W3C traceparent to continue."""
        parent = self.propagator.extract(carrier=dict(headers))
        pending = _Pending(parent, operation, model, max_tokens, temperature, top_p)
        with self._lock:
            self._pending[request_id] = pending
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)

    # ---- the engine side ------------------------------------------------------------------------------------
    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats | None) -> None:
        if iteration_stats is None or not iteration_stats.finished_requests:
            return
        for stats in iteration_stats.finished_requests:
            with self._lock:
                pending = self._pending.pop(stats.request_id, None)
            if pending is not None:
                self._write_span(stats, pending, iteration_stats.timestamp)

    def span_attributes(self, stats: FinishedRequestStats, pending: _Pending) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": pending.operation,
            "gen_ai.system": SYSTEM,
            "gen_ai.request.model": pending.model,
            "gen_ai.response.model": pending.model,
            "gen_ai.response.id": stats.request_id,
            "gen_ai.response.finish_reasons": [stats.finish_reason],
            "gen_ai.usage.input_tokens": stats.num_prompt_tokens,
            "gen_ai.usage.output_tokens": stats.num_generation_tokens,
            "tokenmill.feature": stats.feature or "untagged",
            "tokenmill.gpu_seconds": stats.gpu_seconds,
            "tokenmill.cost_usd": self.gpu_hourly_cost / 3600.0 * stats.gpu_seconds,
            "tokenmill.cached_tokens": stats.num_cached_tokens,
            "tokenmill.e2e_s": stats.e2e_latency,
        }
        optional = {
            "gen_ai.request.max_tokens": pending.max_tokens,
            "gen_ai.request.temperature": pending.temperature,
            "gen_ai.request.top_p": pending.top_p,
            "tokenmill.queue_time_s": stats.queue_time,
            "tokenmill.ttft_s": stats.ttft,
        }
        attributes.update({k: v for k, v in optional.items() if v is not None})
        return attributes

    def _write_span(self, stats: FinishedRequestStats, pending: _Pending, end_time: float) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        start_time = end_time - stats.e2e_latency
        span = self.tracer.start_span(
            f"{pending.operation} {pending.model}", context=pending.parent, kind=SpanKind.SERVER,
            attributes=self.span_attributes(stats, pending), start_time=int(start_time * 1e9),
        )
        if stats.finish_reason == "abort":
            span.set_status(Status(StatusCode.ERROR, "the request was aborted before it finished"))
        span.end(end_time=int(end_time * 1e9))

    def close(self) -> None:
        """Export the spans still batched, then stop the exporter."""
        try:
            self.provider.force_flush(timeout_millis=5000)
        finally:
            self.provider.shutdown()
