"""--otlp-traces-endpoint: a real server exports one span per request over OTLP/HTTP to a receiver here."""

from __future__ import annotations

import http.server
import sys
import threading
import time

import httpx
import pytest

from tests.entrypoints.openai.conftest import ServerProcess

pytest.importorskip("opentelemetry.sdk.trace", reason="tracing needs the otel extra")
pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2", reason="opentelemetry-proto")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tokenmill.metrics.tracing import operation_name, traces_url  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


class OTLPReceiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP collector: decodes each POSTed ExportTraceServiceRequest (protobuf) into .requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, ExportTraceServiceRequest]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                receiver.requests.append((self.path, self.headers["Content-Type"], message))
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def spans(self) -> list:
        return [span for _, _, req in self.requests for rs in req.resource_spans for ss in rs.scope_spans
                for span in ss.spans]


def attributes(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = [x.string_value for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
    return out


@pytest.fixture
def receiver():
    server = OTLPReceiver()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_request_with_traceparent_exports_one_span(server_model_dir, tmp_path, receiver, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export batches every 0.1 s
    proc = ServerProcess([str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "8MiB",
                          "--max-model-len", "256", "--served-model-name", "tiny", "--gpu-hourly-cost", "3.6",
                          "--otlp-traces-endpoint", receiver.url], tmp_path / "server.log")
    try:
        proc.wait_ready()
        r = httpx.post(proc.base_url + "/chat/completions", timeout=60, headers={
            "traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01", "X-Feature": "search"},
            json={"model": "tiny", "messages": [{"role": "user", "content": "hello there"}],
                  "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "ignore_eos": True})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        deadline = time.monotonic() + 15
        while not receiver.spans() and time.monotonic() < deadline:
            time.sleep(0.1)
        spans = receiver.spans()
        assert len(spans) == 1, spans
    finally:
        proc.stop()
    path, content_type, request = receiver.requests[0]
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    resource = {kv.key: kv.value.string_value for kv in request.resource_spans[0].resource.attributes}
    assert resource["service.name"] == "tokenmill"
    span = spans[0]
    # The incoming trace is continued: same trace id, the caller's span as parent.
    assert span.trace_id.hex() == TRACE_ID
    assert span.parent_span_id.hex() == PARENT_SPAN_ID
    assert span.name == "chat tiny"
    assert span.kind == span.SPAN_KIND_SERVER
    attrs = attributes(span)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "tiny"
    assert attrs["gen_ai.request.max_tokens"] == 5
    assert attrs["gen_ai.request.temperature"] == pytest.approx(0.5)
    assert attrs["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 5
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    assert attrs["tokenmill.feature"] == "search"
    assert attrs["tokenmill.cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert attrs["tokenmill.gpu_seconds"] > 0
    assert attrs["tokenmill.cost_usd"] == pytest.approx(3.6 / 3600 * attrs["tokenmill.gpu_seconds"])
    assert 0 <= attrs["tokenmill.queue_time_s"] <= attrs["tokenmill.ttft_s"] <= attrs["tokenmill.e2e_s"]
    duration = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9
    assert duration == pytest.approx(attrs["tokenmill.e2e_s"], abs=0.05)


@pytest.mark.slow
def test_without_traceparent_a_new_trace_starts(server_model_dir, tmp_path, receiver, monkeypatch):
    """A completion without traceparent: its own root span; the batched span is flushed at shutdown."""
    proc = ServerProcess([str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "8MiB",
                          "--max-model-len", "256", "--otlp-traces-endpoint", receiver.url + "/v1/traces"],
                         tmp_path / "server.log")
    try:
        proc.wait_ready()
        r = httpx.post(proc.base_url + "/completions", json={"prompt": "a b c", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        assert proc.stop() == 0
    (span,) = receiver.spans()
    assert span.parent_span_id == b"" and len(span.trace_id) == 16
    assert span.name.startswith("text_completion ")
    attrs = attributes(span)
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["tokenmill.feature"] == "untagged" and attrs["tokenmill.cost_usd"] == 0


@pytest.mark.slow
def test_responses_and_embeddings_export_spans(server_model_dir, tmp_path, receiver, monkeypatch):
    """/v1/responses gets a chat span as /v1/chat/completions does; each /v1/embeddings input an embeddings
    span with its input tokens."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    proc = ServerProcess([str(server_model_dir), "--dtype", "float32", "--kv-cache-memory", "8MiB",
                          "--max-model-len", "256", "--served-model-name", "tiny",
                          "--otlp-traces-endpoint", receiver.url], tmp_path / "server.log")
    try:
        proc.wait_ready()
        traceparent = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"}
        r = httpx.post(proc.base_url + "/responses", timeout=60, headers={**traceparent, "X-Feature": "agent"},
                       json={"input": "hello there", "max_output_tokens": 4, "temperature": 0.5,
                             "ignore_eos": True})
        assert r.status_code == 200, r.text
        response_usage = r.json()["usage"]
        r = httpx.post(proc.base_url + "/embeddings", timeout=60, json={"input": ["one two", "three four five"]})
        assert r.status_code == 200, r.text
        embedding_usage = r.json()["usage"]
        deadline = time.monotonic() + 15
        while len(receiver.spans()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        spans = receiver.spans()
    finally:
        proc.stop()
    assert len(spans) == 3, spans
    by_operation: dict[str, list] = {}
    for span in spans:
        by_operation.setdefault(attributes(span)["gen_ai.operation.name"], []).append(span)
    [chat] = by_operation["chat"]
    assert chat.name == "chat tiny" and chat.trace_id.hex() == TRACE_ID
    attrs = attributes(chat)
    assert attrs["gen_ai.usage.input_tokens"] == response_usage["input_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == response_usage["output_tokens"] == 4
    assert attrs["gen_ai.request.max_tokens"] == 4
    assert attrs["gen_ai.request.temperature"] == pytest.approx(0.5)
    assert attrs["tokenmill.feature"] == "agent"
    embeddings = by_operation["embeddings"]
    assert len(embeddings) == 2 and all(span.name == "embeddings tiny" for span in embeddings)
    attrs = [attributes(span) for span in embeddings]
    assert sum(a["gen_ai.usage.input_tokens"] for a in attrs) == embedding_usage["prompt_tokens"]
    assert all(a["gen_ai.usage.output_tokens"] == 0 and a["gen_ai.response.finish_reasons"] == ["stop"]
               and "gen_ai.request.max_tokens" not in a for a in attrs)


def test_operation_names():
    assert operation_name("/v1/chat/completions") == operation_name("/v1/responses") == "chat"
    assert operation_name("/v1/completions") == "text_completion"
    assert operation_name("/v1/embeddings") == "embeddings"


def test_traces_url():
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("https://c.example/otlp/v1/traces") == "https://c.example/otlp/v1/traces"
    with pytest.raises(ValueError, match="not an http"):
        traces_url("collector:4317")


def test_flag_without_opentelemetry_installed_is_a_clear_error(monkeypatch, capsys):
    # An import of a module mapped to None raises ImportError, as when the package is absent.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    from tokenmill.entrypoints.cli import main

    assert main(["serve", "--otlp-traces-endpoint", "http://127.0.0.1:4318"]) == 2
    err = capsys.readouterr().err
    assert "--otlp-traces-endpoint needs the OpenTelemetry SDK" in err and 'pip install "tokenmill[otel]"' in err


def _stats(request_id: str, finish_reason: str):
    from tokenmill.metrics.stats import FinishedRequestStats

    return FinishedRequestStats(request_id=request_id, feature=None, finish_reason=finish_reason,
                                num_prompt_tokens=3, num_cached_tokens=0, num_generation_tokens=1, e2e_latency=0.5,
                                queue_time=None, ttft=None, mean_time_per_output_token=None, gpu_seconds=0.01)


def test_aborted_request_span_has_error_status_and_unknown_ids_are_ignored():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from tokenmill.metrics import tracing
    from tokenmill.metrics.stats import IterationStats, SchedulerStats

    exporter = InMemorySpanExporter()
    tracer = tracing.RequestTracer("http://127.0.0.1:9", gpu_hourly_cost=0.0, exporter=exporter)
    tracer.start("a", {}, "chat", "m", 8, None, None)
    stats = IterationStats(timestamp=1000.0, finished_requests=[_stats("a", "abort"), _stats("never-started", "stop")])
    tracer.record(SchedulerStats(), stats)
    tracer.close()
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert (span.start_time, span.end_time) == (int(999.5e9), int(1000e9))
    # Unset sampling values and missing timings are left out, not written as zeros.
    assert "gen_ai.request.temperature" not in span.attributes and "tokenmill.ttft_s" not in span.attributes
    assert span.attributes["gen_ai.request.max_tokens"] == 8


def test_pending_requests_are_bounded(monkeypatch):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tokenmill.metrics import tracing

    monkeypatch.setattr(tracing, "MAX_PENDING", 3)
    tracer = tracing.RequestTracer("http://127.0.0.1:9", exporter=InMemorySpanExporter())
    for i in range(5):
        tracer.start(str(i), {}, "chat", "m", None, None, None)
    assert list(tracer._pending) == ["2", "3", "4"]
    tracer.close()
