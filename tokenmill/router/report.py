"""`tokenmill route report`: per feature, requests, escalation rate, cost, cost if all had gone to the strong tier,
and savings, from the router's usage log (and the escalation log's reasons)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.metrics.prometheus import UNTAGGED
from tokenmill.router.logs import read_records


@dataclass
class FeatureReport:
    feature: str
    requests: int = 0
    errors: int = 0
    escalations: int = 0
    cost_usd: float = 0.0
    # What the requests would have cost had every one gone to its route's escalation tier (routes without one:
    # their actual cost).
    strong_cost_usd: float = 0.0
    escalation_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def escalation_rate(self) -> float:
        return self.escalations / self.requests if self.requests else 0.0

    @property
    def saved_usd(self) -> float:
        return self.strong_cost_usd - self.cost_usd

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), escalation_rate=self.escalation_rate, saved_usd=self.saved_usd)


def build_report(usage_records: list[dict[str, Any]],
                 escalation_records: list[dict[str, Any]] | None = None) -> list[FeatureReport]:
    by_feature: dict[str, FeatureReport] = {}
    for record in usage_records:
        feature = record.get("feature") or UNTAGGED
        report = by_feature.setdefault(feature, FeatureReport(feature))
        report.requests += 1
        if record.get("status") != 200:
            report.errors += 1
        if record.get("escalated"):
            report.escalations += 1
        cost = record.get("cost_usd") or 0.0
        report.cost_usd += cost
        strong = record.get("strong_cost_usd")
        report.strong_cost_usd += strong if strong is not None and record.get("saved_usd") is not None else cost
    reasons: dict[str, Counter] = defaultdict(Counter)
    for record in escalation_records or []:
        reasons[record.get("feature") or UNTAGGED][(record.get("reason") or {}).get("check", "?")] += 1
    for feature, counts in reasons.items():
        if feature in by_feature:
            by_feature[feature].escalation_reasons = dict(counts)
    return sorted(by_feature.values(), key=lambda r: r.feature)


def format_table(reports: list[FeatureReport]) -> str:
    header = f"{'feature':<24} {'requests':>8} {'errors':>6} {'escalated':>9} {'rate':>6} {'cost $':>12} " \
             f"{'all-strong $':>12} {'saved $':>12}"
    lines = [header, "-" * len(header)]
    total = FeatureReport("TOTAL")
    for r in reports:
        lines.append(f"{r.feature:<24} {r.requests:>8} {r.errors:>6} {r.escalations:>9} {r.escalation_rate:>6.1%} "
                     f"{r.cost_usd:>12.6f} {r.strong_cost_usd:>12.6f} {r.saved_usd:>12.6f}")
        total.requests += r.requests
        total.errors += r.errors
        total.escalations += r.escalations
        total.cost_usd += r.cost_usd
        total.strong_cost_usd += r.strong_cost_usd
    lines.append("-" * len(header))
    lines.append(f"{'TOTAL':<24} {total.requests:>8} {total.errors:>6} {total.escalations:>9} "
                 f"{total.escalation_rate:>6.1%} {total.cost_usd:>12.6f} {total.strong_cost_usd:>12.6f} "
                 f"{total.saved_usd:>12.6f}")
    return "\n".join(lines)


def plot_report(reports: list[FeatureReport], path: str | Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'tokenmill[plot]'") from None
    names = [r.feature for r in reports]
    xs = range(len(reports))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.5 * len(reports) + 4), 4))
    width = 0.4
    ax1.bar([x - width / 2 for x in xs], [r.cost_usd for r in reports], width, label="actual")
    ax1.bar([x + width / 2 for x in xs], [r.strong_cost_usd for r in reports], width, label="all on strong tier")
    ax1.set_xticks(list(xs), names, rotation=30, ha="right")
    ax1.set_ylabel("USD")
    ax1.set_title("Cost per feature")
    ax1.legend()
    ax2.bar(list(xs), [100 * r.escalation_rate for r in reports])
    ax2.set_xticks(list(xs), names, rotation=30, ha="right")
    ax2.set_ylabel("% of requests")
    ax2.set_title("Escalation rate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_report(usage_log: str, escalation_log: str | None, as_json: bool, plot: str | None) -> str:
    if not Path(usage_log).exists():
        raise FileNotFoundError(f"usage log not found: {usage_log}")
    escalations = read_records(escalation_log) if escalation_log and Path(escalation_log).exists() else []
    reports = build_report(read_records(usage_log), escalations)
    if plot:
        plot_report(reports, plot)
    if as_json:
        return json.dumps({"features": [r.to_dict() for r in reports]}, indent=2)
    return format_table(reports)
