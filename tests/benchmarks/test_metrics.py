"""metrics.py: the formulas vLLM's bench reports, checked on hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokenmill.benchmarks.metrics import (
    RequestResult,
    compute_metrics,
    format_report,
    peak_concurrency,
    percentile,
    summarize,
    tpot,
)


def test_tpot_excludes_the_first_token():
    # 1 s to the first token, then 9 more tokens over 0.9 s: 100 ms per token after the first.
    assert tpot(latency=1.9, ttft=1.0, output_len=10) == pytest.approx(0.1)
    assert RequestResult(prompt_len=3, output_len=10, ttft=1.0, latency=1.9).tpot == pytest.approx(0.1)


@pytest.mark.parametrize("output_len", [0, 1])
def test_tpot_is_undefined_below_two_tokens(output_len):
    assert tpot(latency=1.0, ttft=1.0, output_len=output_len) is None


def test_percentile_interpolates_linearly_like_numpy():
    values = [7.0, 1.0, 3.0, 10.0, 2.5, 4.0, 100.0]
    for p in (0, 10, 25, 50, 90, 99, 100):
        assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)


def test_summarize_reports_milliseconds():
    stats = summarize([0.010, 0.020, 0.030, 0.040], percentiles=(90, 99))
    assert stats.mean == pytest.approx(25.0)
    assert stats.median == pytest.approx(25.0)
    assert stats.percentiles == {"p90": pytest.approx(37.0), "p99": pytest.approx(39.7)}
    assert stats.std == pytest.approx(float(np.std([10, 20, 30, 40])))
    assert stats.count == 4
    assert summarize([]).count == 0


def test_compute_metrics_totals_and_throughputs():
    results = [
        RequestResult(prompt_len=10, output_len=5, ttft=0.1, latency=0.5, itl=[0.1] * 4, start_time=0.0),
        RequestResult(prompt_len=20, output_len=3, ttft=0.2, latency=0.4, itl=[0.1, 0.1], start_time=0.5),
        RequestResult(prompt_len=30, output_len=1, ttft=0.3, latency=0.3, itl=[], start_time=0.6),
        RequestResult(prompt_len=99, success=False, error="HTTP 500"),
    ]
    m = compute_metrics(results, duration_s=2.0)
    assert (m.num_completed, m.num_failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (60, 9)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.5)
    assert m.total_token_throughput == pytest.approx(34.5)
    assert m.latency["ttft"].mean == pytest.approx(200.0)
    # TPOT over the two requests with 2+ tokens: (0.5-0.1)/4 = 0.1 and (0.4-0.2)/2 = 0.1.
    assert m.latency["tpot"].count == 2 and m.latency["tpot"].mean == pytest.approx(100.0)
    assert m.latency["itl"].count == 6
    assert m.latency["e2el"].median == pytest.approx(400.0)
    # [0, 0.5) and [0.5, 0.9) touch but do not overlap; [0.6, 0.9) overlaps the second.
    assert m.max_concurrency_observed == 2
    text = format_report(m, "Test")
    assert "Failed requests:" in text and "P99 TTFT (ms):" in text and "Median TPOT (ms):" in text
    with pytest.raises(ValueError, match="positive"):
        compute_metrics(results, duration_s=0.0)


def test_peak_concurrency():
    def r(start, latency):
        return RequestResult(prompt_len=1, start_time=start, latency=latency)

    assert peak_concurrency([]) == 0
    assert peak_concurrency([r(0, 1), r(1, 1), r(2, 1)]) == 1
    assert peak_concurrency([r(0, 10), r(1, 1), r(2, 1), r(2.5, 1)]) == 3
