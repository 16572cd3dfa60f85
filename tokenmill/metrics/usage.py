"""Cost metering: one JSON line per finished request (--usage-log), priced from the engine time it took.

gpu_seconds is the request's share of every engine step it took part in (each step's time is split between
the requests in it by the tokens each computed), so the records of all requests add up to the engine's busy
time. cost_usd = gpu_hourly_cost / 3600 x gpu_seconds.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from tokenmill.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats, StatLogger

logger = logging.getLogger("tokenmill.usage")

BACKEND = "tokenmill"


def usage_record(stats: FinishedRequestStats, model: str, gpu_hourly_cost: float) -> dict:
    """The usage-log record of one finished request (field names are part of the documented format)."""
    return {
        "request_id": stats.request_id,
        "feature": stats.feature,
        "inference.backend": BACKEND,
        "model": model,
        "gpu_seconds": stats.gpu_seconds,
        "input_tokens": stats.num_prompt_tokens,
        "cached_tokens": stats.num_cached_tokens,
        "output_tokens": stats.num_generation_tokens,
        "ttft_s": stats.ttft,
        "e2e_s": stats.e2e_latency,
        "finish_reason": stats.finish_reason,
        "cost_usd": gpu_hourly_cost / 3600.0 * stats.gpu_seconds,
    }


class UsageLogger(StatLogger):
    """Appends one JSON line per finished request to a file; each line is flushed when written."""

    def __init__(self, path: str | Path, model: str, gpu_hourly_cost: float = 0.0) -> None:
        self.path = Path(path)
        self.model = model
        self.gpu_hourly_cost = gpu_hourly_cost
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the server's life
        self._lock = threading.Lock()

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats | None) -> None:
        if iteration_stats is None or not iteration_stats.finished_requests:
            return
        lines = "".join(
            json.dumps(usage_record(req, self.model, self.gpu_hourly_cost)) + "\n"
            for req in iteration_stats.finished_requests
        )
        with self._lock:
            if self._file.closed:
                return
            self._file.write(lines)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
