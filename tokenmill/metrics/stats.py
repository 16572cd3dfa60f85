"""Stats handed from the engine loop to the stat loggers (Prometheus, periodic log line, usage log).

The engine thread builds one SchedulerStats and one IterationStats per loop iteration and passes them to every
StatLogger.record(). Loggers run on the engine thread: they must be quick and must not touch the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the engine's state after an iteration; the counters are cumulative since start."""

    num_running: int = 0
    num_waiting: int = 0
    # Fraction of KV blocks in use, 0..1 (cached-but-free prefix blocks count as free).
    kv_cache_usage: float = 0.0
    # Prompt tokens looked up in the prefix cache, and how many of them were found.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    # Seconds spent inside engine steps that computed tokens (the sum of every request's gpu_seconds).
    busy_seconds: float = 0.0
    num_steps: int = 0
    # KV cache capacity, for the start-up log and /metrics.
    num_kv_blocks: int = 0
    block_size: int = 0


@dataclass
class FinishedRequestStats:
    """One request (all n of its samples) at the end of its life, finished or aborted."""

    request_id: str
    # The caller's feature tag (X-Feature header or metadata.feature), None when untagged.
    feature: str | None
    # "stop", "length" or "abort".
    finish_reason: str
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generation_tokens: int
    # Seconds from arrival to the end.
    e2e_latency: float
    # Seconds from arrival to the first step that scheduled it (None if never scheduled).
    queue_time: float | None
    # Seconds from arrival to the first output token (None if none was produced).
    ttft: float | None
    # Mean seconds per output token after the first (None with fewer than 2 tokens).
    mean_time_per_output_token: float | None
    # The request's share of engine step time: each step's time split by the tokens each request computed.
    gpu_seconds: float


@dataclass
class IterationStats:
    """What happened in one engine loop iteration (one step, plus the aborts handled before it)."""

    # Wall-clock time (time.time()) at the end of the iteration.
    timestamp: float
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    # Seconds from arrival to first token, one entry per request (per sample) that got its first token now.
    time_to_first_tokens: list[float] = field(default_factory=list)
    # Seconds between consecutive output tokens of a sample, one entry per token after the first.
    inter_token_latencies: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.num_prompt_tokens or self.num_generation_tokens or self.finished_requests)


class StatLogger(ABC):
    """Receives the stats of every engine iteration.

    Contract: record() is called on the engine thread after each iteration (iteration_stats is None when the
    iteration ran nothing); it must not block, must not raise (the engine logs and ignores exceptions), and
    must not call into the engine. Readers on other threads see only what the logger publishes itself.
    """

    @abstractmethod
    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats | None) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release resources at shutdown."""
