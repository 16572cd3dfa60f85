"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed).

- latency CDFs: TTFT, TPOT, ITL and end-to-end latency, one curve per run (e.g. per concurrency of a sweep);
- a sweep: output throughput and p99 TTFT against the concurrency.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenmill.benchmarks.metrics import LATENCY_METRICS, BenchmarkMetrics, RequestResult


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib (or tokenmill[plot])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path, title: str) -> Path:
    """Titles, lays out and writes the figure as PNG (creating the folder), then frees it."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metric_values_ms(results: Sequence[RequestResult], key: str) -> list[float]:
    ok = [r for r in results if r.success]
    if key == "ttft":
        values = [r.ttft for r in ok if r.output_len > 0]
    elif key == "tpot":
        values = [t for t in (r.tpot for r in ok) if t is not None]
    elif key == "itl":
        values = [gap for r in ok for gap in r.itl]
    else:
        values = [r.latency for r in ok]
    return sorted(v * 1000.0 for v in values)


def plot_latency_cdfs(
    runs: Sequence[tuple[str, Sequence[RequestResult]]], path: str | Path, title: str = ""
) -> Path:
    """One panel per latency metric; each run is a labelled empirical CDF."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, (section, label)) in zip(axes.flat, LATENCY_METRICS.items(), strict=True):
        for run_label, results in runs:
            values = _metric_values_ms(results, key)
            if not values:
                continue
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, fractions, where="post", label=run_label)
        ax.set_title(f"{label}: {section}", fontsize=10)
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of token gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.has_data() and len(runs) > 1:
            ax.legend(fontsize=8)
    return _save(plt, fig, path, title)


def plot_sweep(
    concurrencies: Sequence[int], metrics: Sequence[BenchmarkMetrics], path: str | Path, title: str = ""
) -> Path:
    """Output tok/s and p99 TTFT against max concurrency (log2 axis)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(concurrencies, [m.output_throughput for m in metrics], marker="o", label="output tok/s")
    left.plot(
        concurrencies,
        [m.total_token_throughput for m in metrics],
        marker="s",
        linestyle="--",
        label="total tok/s",
    )
    left.set_ylabel("tokens / s")
    left.set_title("Throughput")
    left.legend(fontsize=8)
    right.plot(
        concurrencies,
        [m.latency["ttft"].percentiles.get("p99", float("nan")) for m in metrics],
        marker="o",
        color="tab:red",
    )
    right.set_ylabel("p99 TTFT (ms)")
    right.set_title("p99 time to first token")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(concurrencies), [str(c) for c in concurrencies])
        ax.set_xlabel("max concurrency")
        ax.grid(alpha=0.3)
    return _save(plt, fig, path, title)
