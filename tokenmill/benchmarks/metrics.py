"""Benchmark figures from per-request timings, as vLLM's bench reports them. Pure functions, no I/O.

Definitions (all per request, times in seconds here and milliseconds in the report):
- TTFT  time to first token: first output token received - request sent.
- E2EL  end-to-end latency: last output token received - request sent.
- TPOT  time per output token after the first: (E2EL - TTFT) / (output tokens - 1); undefined for 1 token.
- ITL   inter-token latency: each gap between two successive output arrivals (a streamed chunk carrying
  several tokens is one arrival, so one gap), pooled over all requests.
Throughputs divide totals by the benchmark's wall-clock duration (first request sent -> last one finished).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

# The percentiles reported besides the mean and the median.
DEFAULT_PERCENTILES: tuple[float, ...] = (90.0, 99.0)

# metric key -> (title in the report, label)
LATENCY_METRICS: dict[str, tuple[str, str]] = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


@dataclass
class RequestResult:
    """What one request measured. Times are seconds; start_time is relative to the benchmark's start."""

    prompt_len: int
    # Output tokens generated (the server's usage count when it reports one).
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    # Gaps between successive output arrivals after the first.
    itl: list[float] = field(default_factory=list)
    start_time: float = 0.0
    success: bool = True
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return tpot(self.latency, self.ttft, self.output_len)


def tpot(latency: float, ttft: float, output_len: int) -> float | None:
    """(latency - TTFT) / (output_len - 1): mean decode time per token after the first; None below 2."""
    if output_len < 2:
        return None
    return (latency - ttft) / (output_len - 1)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0 <= p <= 100) by linear interpolation between closest ranks (numpy's default).

    percentile([1, 2, 3, 4], 50) == 2.5; an empty input gives nan.
    """
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile {p} is outside [0, 100]")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass
class LatencyStats:
    """Summary of one latency metric, in milliseconds."""

    mean: float
    median: float
    std: float
    # "p90" -> value, one per asked-for percentile
    percentiles: dict[str, float]
    count: int


def _format_p(p: float) -> str:
    return f"p{p:g}".replace(".", "_")


def summarize(values_s: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> LatencyStats:
    """Mean, median, standard deviation and percentiles of values in seconds, reported in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    if not ms:
        nan = math.nan
        return LatencyStats(nan, nan, nan, {_format_p(p): nan for p in percentiles}, 0)
    mean = sum(ms) / len(ms)
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms))
    return LatencyStats(
        mean=mean,
        median=percentile(ms, 50.0),
        std=std,
        percentiles={_format_p(p): percentile(ms, p) for p in percentiles},
        count=len(ms),
    )


@dataclass
class BenchmarkMetrics:
    num_completed: int
    num_failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    # "ttft" / "tpot" / "itl" / "e2el" -> summary in ms
    latency: dict[str, LatencyStats]
    # Highest number of requests in flight at once (from start times and latencies).
    max_concurrency_observed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """The most requests in flight at any instant, from each request's [start, start + latency) interval."""
    events = []
    for r in results:
        events.append((r.start_time, 1))
        events.append((r.start_time + r.latency, -1))
    # At equal times ends (-1) sort before starts (+1): a request ending as another starts does not overlap.
    events.sort()
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def compute_metrics(
    results: Sequence[RequestResult], duration_s: float, percentiles: Sequence[float] = DEFAULT_PERCENTILES
) -> BenchmarkMetrics:
    """Aggregate successful requests' results; failed ones are only counted."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s} s")
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len for r in ok)
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    latency = {
        "ttft": summarize([r.ttft for r in ok if r.output_len > 0], percentiles),
        "tpot": summarize(tpots, percentiles),
        "itl": summarize([gap for r in ok for gap in r.itl], percentiles),
        "e2el": summarize([r.latency for r in ok], percentiles),
    }
    return BenchmarkMetrics(
        num_completed=len(ok),
        num_failed=len(results) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=len(ok) / duration_s,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        latency=latency,
        max_concurrency_observed=peak_concurrency(ok),
    )


def format_report(metrics: BenchmarkMetrics, title: str, extra: dict[str, object] | None = None) -> str:
    """A plain-text table in the layout of vLLM's bench output."""
    width = 50
    lines = [f" {title} ".center(width, "=")]

    def row(name: str, value: object) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<40}{text:>10}")

    row("Successful requests:", metrics.num_completed)
    if metrics.num_failed:
        row("Failed requests:", metrics.num_failed)
    for name, value in (extra or {}).items():
        row(f"{name}:", value)
    row("Benchmark duration (s):", metrics.duration_s)
    row("Total input tokens:", metrics.total_input_tokens)
    row("Total generated tokens:", metrics.total_output_tokens)
    row("Request throughput (req/s):", metrics.request_throughput)
    row("Output token throughput (tok/s):", metrics.output_throughput)
    row("Total token throughput (tok/s):", metrics.total_token_throughput)
    row("Peak concurrent requests:", metrics.max_concurrency_observed)
    for key, (section, label) in LATENCY_METRICS.items():
        stats = metrics.latency[key]
        if stats.count == 0:
            continue
        lines.append(f" {section} ".center(width, "-"))
        row(f"Mean {label} (ms):", stats.mean)
        row(f"Median {label} (ms):", stats.median)
        for name, value in stats.percentiles.items():
            row(f"{name.upper().replace('_', '.')} {label} (ms):", value)
    lines.append("=" * width)
    return "\n".join(lines)
