"""The Grafana dashboard queries only metric names that a live /metrics scrape of the server exports."""

from __future__ import annotations

import json
import re

import httpx
import pytest
import yaml

from tests.deploy.conftest import API_KEY
from tests.deploy.tools import DASHBOARD, RULES

# tokenmill's and vLLM's metric names all carry a colon (vllm:..., tokenmill:...); PromQL functions,
# labels and Grafana variables never do.
METRIC_NAME = re.compile(r"\b([a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]*)")


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def scraped_names(text: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_dashboard_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for needed in ("Request rate", "Time to first token", "Inter-token latency", "End-to-end latency",
                   "Running and waiting", "KV cache usage", "Prefix cache hit rate", "Preemptions",
                   "Cost per feature", "GPU-seconds per feature"):
        assert needed in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.slow
def test_dashboard_metrics_are_exported_by_a_live_server(monitored_server):
    server = monitored_server
    headers = {"Authorization": f"Bearer {API_KEY}", "X-Feature": "search"}
    r = httpx.post(server.base_url + "/completions", headers=headers, timeout=60,
                   json={"prompt": "hello hello hello", "max_tokens": 4})
    assert r.status_code == 200, r.text
    # A refused request, so the refusal counter has a sample.
    assert httpx.post(server.base_url + "/completions", json={"prompt": "x"}, timeout=10).status_code == 401
    server.wait_idle()
    exported = scraped_names(httpx.get(server.url + "/metrics", timeout=10).text)
    used = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 15, used
    missing = used - exported
    assert not missing, f"the dashboard queries metrics the server does not export: {sorted(missing)}"
    # The engine alerts use exported names too (the router's are checked against its own metrics).
    rule_exprs = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    rule_names = {n for e in rule_exprs for n in METRIC_NAME.findall(e) if not n.startswith("tokenmill_router:")}
    assert rule_names and not rule_names - exported, sorted(rule_names - exported)
