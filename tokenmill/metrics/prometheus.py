"""Prometheus metrics with vLLM's names (vllm:*) and a model_name label, plus tokenmill's own (tokenmill:*).

Each PrometheusStatLogger owns its CollectorRegistry, so several servers (or tests) in one process do not
collide. Counters, gauges and histograms are thread-safe: the engine thread records, the HTTP thread renders.
"""

from __future__ import annotations

import threading

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tokenmill.metrics.stats import IterationStats, SchedulerStats, StatLogger

# Bucket bounds in seconds, spanning a tiny CPU model's milliseconds to a long GPU queue's minutes.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                         5.0, 10.0, 20.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.01, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

# Label used for requests without a feature tag, and for tags beyond max_features (bounded cardinality).
UNTAGGED = "untagged"
OTHER = "other"


class PrometheusStatLogger(StatLogger):
    def __init__(self, model_name: str, gpu_hourly_cost: float = 0.0, max_features: int = 256) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.gpu_hourly_cost = gpu_hourly_cost
        self.max_features = max_features
        self._features: set[str] = set()
        self._lock = threading.Lock()
        # Cumulative engine counters last seen, to turn snapshots into counter increments.
        self._last = SchedulerStats()
        r, m = self.registry, ["model_name"]

        def gauge(name, doc):
            return Gauge(name, doc, m, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, m, registry=r).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, m, buckets=buckets, registry=r).labels(model_name)

        self.num_running = gauge("vllm:num_requests_running", "Requests (samples) in the running batch.")
        self.num_waiting = gauge("vllm:num_requests_waiting", "Requests (samples) waiting to be scheduled.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV cache usage: fraction of blocks in use (0..1).")
        self.gpu_cache_usage = gauge("vllm:gpu_cache_usage_perc",
                                     "KV cache usage, 0..1 (older name of vllm:kv_cache_usage_perc).")
        self.num_kv_blocks = gauge("tokenmill:kv_cache_num_blocks", "KV cache capacity in blocks.")
        self.kv_block_size = gauge("tokenmill:kv_cache_block_size", "Tokens per KV cache block.")
        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("vllm:num_preemptions", "Requests preempted (blocks freed, recomputed later).")
        self.busy_seconds = counter("tokenmill:engine_busy_seconds",
                                    "Seconds spent in engine steps; equals the sum of requests' gpu_seconds.")
        self.num_steps = counter("tokenmill:engine_steps", "Engine steps that computed tokens.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.request_success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Seconds from arrival to the first token.",
                              TTFT_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Per request: mean seconds per output token after the first.", TOKEN_LATENCY_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Seconds between consecutive output tokens.",
                             TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Seconds from arrival to the end of a request.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Seconds from arrival to the first scheduling.", REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                               TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Generated tokens per request.", TOKEN_COUNT_BUCKETS)
        f = ["model_name", "feature"]
        self.feature_requests = Counter("tokenmill:feature_requests", "Finished requests per feature tag.", f,
                                        registry=r)
        self.feature_input_tokens = Counter("tokenmill:feature_input_tokens", "Prompt tokens per feature tag.", f,
                                            registry=r)
        self.feature_cached_tokens = Counter("tokenmill:feature_cached_tokens",
                                             "Prompt tokens served from the prefix cache per feature tag.", f,
                                             registry=r)
        self.feature_output_tokens = Counter("tokenmill:feature_output_tokens", "Generated tokens per feature tag.",
                                             f, registry=r)
        self.feature_gpu_seconds = Counter("tokenmill:feature_gpu_seconds",
                                           "Engine (GPU) seconds per feature tag.", f, registry=r)
        self.feature_cost = Counter("tokenmill:feature_cost_usd",
                                    "Cost in USD per feature tag (gpu_seconds x --gpu-hourly-cost / 3600).", f,
                                    registry=r)
        self.rejected = Counter("tokenmill:rejected_requests",
                                "Requests refused before reaching the engine, by reason.",
                                ["model_name", "reason"], registry=r)

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats | None) -> None:
        s, last = scheduler_stats, self._last
        self.num_running.set(s.num_running)
        self.num_waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_cache_usage)
        self.gpu_cache_usage.set(s.kv_cache_usage)
        self.num_kv_blocks.set(s.num_kv_blocks)
        self.kv_block_size.set(s.block_size)
        self.prefix_queries.inc(s.prefix_cache_queries - last.prefix_cache_queries)
        self.prefix_hits.inc(s.prefix_cache_hits - last.prefix_cache_hits)
        self.preemptions.inc(s.num_preemptions - last.num_preemptions)
        self.busy_seconds.inc(s.busy_seconds - last.busy_seconds)
        self.num_steps.inc(s.num_steps - last.num_steps)
        self._last = s
        if iteration_stats is None:
            return
        it = iteration_stats
        self.prompt_tokens.inc(it.num_prompt_tokens)
        self.generation_tokens.inc(it.num_generation_tokens)
        for value in it.time_to_first_tokens:
            self.ttft.observe(value)
        for value in it.inter_token_latencies:
            self.itl.observe(value)
        for req in it.finished_requests:
            self.request_success.labels(self.model_name, req.finish_reason).inc()
            self.e2e.observe(req.e2e_latency)
            if req.queue_time is not None:
                self.queue_time.observe(req.queue_time)
            if req.mean_time_per_output_token is not None:
                self.tpot.observe(req.mean_time_per_output_token)
            self.request_prompt_tokens.observe(req.num_prompt_tokens)
            self.request_generation_tokens.observe(req.num_generation_tokens)
            labels = (self.model_name, self._feature_label(req.feature))
            self.feature_requests.labels(*labels).inc()
            self.feature_input_tokens.labels(*labels).inc(req.num_prompt_tokens)
            self.feature_cached_tokens.labels(*labels).inc(req.num_cached_tokens)
            self.feature_output_tokens.labels(*labels).inc(req.num_generation_tokens)
            self.feature_gpu_seconds.labels(*labels).inc(req.gpu_seconds)
            self.feature_cost.labels(*labels).inc(req.gpu_seconds * self.gpu_hourly_cost / 3600.0)

    def record_rejected(self, reason: str) -> None:
        """A request refused before the engine: "auth", "rate_limit", "queue_full", "draining", "loading"."""
        self.rejected.labels(self.model_name, reason).inc()

    def _feature_label(self, feature: str | None) -> str:
        if feature is None:
            return UNTAGGED
        with self._lock:
            if feature in self._features:
                return feature
            if len(self._features) >= self.max_features:
                return OTHER
            self._features.add(feature)
            return feature

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
