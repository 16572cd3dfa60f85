"""Stats handed from the engine loop to the stat loggers (Prometheus, periodic log line, usage log).

The engine core sends its SchedulerStats with every step's outputs. The front end's engine thread builds one
IterationStats per loop iteration (token timings through RequestTimings, the one place TTFT, inter-token and
end-to-end latencies are computed) and passes both to every StatLogger.record(). Loggers run on the engine
thread: they must be quick and must not touch the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill.outputs import EmbeddingRequestOutput, RequestOutput


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


class RequestTimings:
    """The token timings of one request (all n of its samples), from the timestamps of the engine steps whose
    outputs carried its tokens. The one place TTFT, inter-token latency, time per output token and end-to-end
    latency are computed: the server's metrics and the offline benchmark both read them from here."""

    def __init__(self, arrival_time: float, num_samples: int) -> None:
        # time.time() when the request arrived at the front end.
        self.arrival_time = arrival_time
        n = max(num_samples, 1)
        # Per sample: output tokens seen so far, and the times of its first and latest tokens.
        self.num_seen = [0] * n
        self.first_token_time: list[float | None] = [None] * n
        self.last_token_time: list[float | None] = [None] * n
        # Seconds between consecutive outputs of a sample, every sample's in order of arrival.
        self.inter_token_latencies: list[float] = []

    def observe(self, output: RequestOutput | EmbeddingRequestOutput, timestamp: float,
                stats: IterationStats | None = None) -> int:
        """Fold in one (cumulative) output that an engine step finished at timestamp; returns the new tokens (a
        finished pooling request counts as one). The TTFTs and ITLs found are added to stats when given."""
        from tokenmill.outputs import EmbeddingRequestOutput

        if isinstance(output, EmbeddingRequestOutput):
            if not output.finished or self.first_token_time[0] is not None:
                return 0
            self.first_token_time[0] = self.last_token_time[0] = timestamp
            return 1
        total_new = 0
        for completion in output.outputs:
            i = completion.index
            num_tokens = len(completion.token_ids)
            num_new = num_tokens - self.num_seen[i]
            if num_new <= 0:
                continue
            last = self.last_token_time[i]
            if last is None:
                self.first_token_time[i] = timestamp
                if stats is not None:
                    stats.time_to_first_tokens.append(timestamp - self.arrival_time)
            else:
                self.inter_token_latencies.append(timestamp - last)
                if stats is not None:
                    stats.inter_token_latencies.append(timestamp - last)
            if stats is not None:
                stats.num_generation_tokens += num_new
            self.num_seen[i] = num_tokens
            self.last_token_time[i] = timestamp
            total_new += num_new
        return total_new

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token of any sample (None before it)."""
        firsts = [t for t in self.first_token_time if t is not None]
        return min(firsts) - self.arrival_time if firsts else None

    @property
    def time_per_output_token(self) -> float | None:
        """Mean seconds per output token after the first, of the longest sample (None with fewer than 2)."""
        i = max(range(len(self.num_seen)), key=self.num_seen.__getitem__)
        first, last = self.first_token_time[i], self.last_token_time[i]
        if first is None or last is None or self.num_seen[i] < 2:
            return None
        return (last - first) / (self.num_seen[i] - 1)

    def e2e_latency(self, end_time: float) -> float:
        return max(0.0, end_time - self.arrival_time)

    def finished(self, output: RequestOutput | EmbeddingRequestOutput, reason: str, now: float,
                 feature: str | None) -> FinishedRequestStats:
        """The request's stats at the end of its life (finished at now, or aborted)."""
        from tokenmill.outputs import RequestOutput

        m = output.metrics
        num_generation = sum(len(c.token_ids) for c in output.outputs) if isinstance(output, RequestOutput) else 0
        return FinishedRequestStats(
            request_id=output.request_id,
            feature=feature,
            finish_reason=reason,
            num_prompt_tokens=len(output.prompt_token_ids),
            num_cached_tokens=output.num_cached_tokens,
            num_generation_tokens=num_generation,
            e2e_latency=self.e2e_latency(now),
            queue_time=(m.first_scheduled_time - self.arrival_time) if m and m.first_scheduled_time else None,
            ttft=self.ttft,
            mean_time_per_output_token=self.time_per_output_token,
            gpu_seconds=m.compute_seconds if m else 0.0,
        )
