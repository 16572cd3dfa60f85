"""The periodic log line: throughput, running/waiting requests, KV cache usage, prefix cache hit rate."""

from __future__ import annotations

import logging
import threading
import time

from tokenmill.metrics.stats import IterationStats, SchedulerStats, StatLogger

logger = logging.getLogger("tokenmill.stats")


class LoggingStatLogger(StatLogger):
    """Accumulates on the engine thread; log() (called every --log-stats-interval seconds from the server's
    event loop) writes one line while the engine is busy, and one more when it turns idle."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = SchedulerStats()
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._last_log_time = time.monotonic()
        self._last_logged = SchedulerStats()
        self._was_active = False

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats | None) -> None:
        with self._lock:
            self._stats = scheduler_stats
            if iteration_stats is not None:
                self._num_prompt_tokens += iteration_stats.num_prompt_tokens
                self._num_generation_tokens += iteration_stats.num_generation_tokens

    def log(self) -> str | None:
        """Log and return the line, or None when there was nothing to report."""
        now = time.monotonic()
        with self._lock:
            s, last = self._stats, self._last_logged
            num_prompt, num_generation = self._num_prompt_tokens, self._num_generation_tokens
            self._num_prompt_tokens = self._num_generation_tokens = 0
            elapsed = max(now - self._last_log_time, 1e-9)
            self._last_log_time, self._last_logged = now, s
        active = bool(num_prompt or num_generation or s.num_running or s.num_waiting)
        if not active and not self._was_active:
            return None
        self._was_active = active
        queries = s.prefix_cache_queries - last.prefix_cache_queries
        hits = s.prefix_cache_hits - last.prefix_cache_hits
        line = (
            f"Avg prompt throughput: {num_prompt / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {num_generation / elapsed:.1f} tokens/s, "
            f"Running: {s.num_running} reqs, Waiting: {s.num_waiting} reqs, "
            f"KV cache usage: {100 * s.kv_cache_usage:.1f}%, "
            f"Prefix cache hit rate: {100 * hits / queries if queries else 0.0:.1f}%"
        )
        logger.info(line)
        return line
