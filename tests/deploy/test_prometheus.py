"""The alert rules under promtool, and a real Prometheus scraping a real `tokenmill serve` on loopback."""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import pytest
import yaml

from tests.deploy.conftest import API_KEY, GPU_HOURLY_COST
from tests.deploy.tools import PROMETHEUS, RULES, require_tool
from tests.entrypoints.openai.conftest import free_port

ALERTS = {"TokenmillTTFTP95High", "TokenmillE2ELatencyP95High", "TokenmillKVCacheUsageHigh",
          "TokenmillQueueDepthHigh", "TokenmillErrorRateHigh", "TokenmillRequestsRefused",
          "TokenmillRouterEscalationRateHigh"}


def test_promtool_check_rules():
    promtool = require_tool("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_cover_every_alert():
    promtool = require_tool("promtool", "prometheus")
    tests_file = PROMETHEUS / "tokenmill-rules.test.yaml"
    rules = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert rules == ALERTS
    tested = {t["alertname"] for case in yaml.safe_load(tests_file.read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert tested == ALERTS, f"alerts without a unit test: {ALERTS - tested}"
    result = subprocess.run([promtool, "test", "rules", tests_file.name], cwd=PROMETHEUS, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_fail_when_a_threshold_is_off(tmp_path):
    """The KV test is sharp: with the threshold raised to 95% its firing case fails."""
    promtool = require_tool("promtool", "prometheus")
    (tmp_path / "tokenmill-rules.yaml").write_text(RULES.read_text().replace(
        "(vllm:kv_cache_usage_perc) > 0.85", "(vllm:kv_cache_usage_perc) > 0.95"))
    (tmp_path / "t.yaml").write_text((PROMETHEUS / "tokenmill-rules.test.yaml").read_text())
    result = subprocess.run([promtool, "test", "rules", "t.yaml"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "TokenmillKVCacheUsageHigh" in result.stdout + result.stderr


class PrometheusStarting(Exception):
    """Prometheus answered 503: it is up but not ready to answer queries yet."""


class Prometheus:
    """`prometheus` on a loopback port, scraping the given target every second, with the alert rules loaded."""

    def __init__(self, binary: str, target: str, workdir) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "tokenmill", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self._log, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        if r.status_code == 503:  # "Service Unavailable": still starting (its storage not ready yet)
            raise PrometheusStarting(r.text)
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_path.read_text()}")
            try:
                result = self.query(expr)
                if result:
                    return result
            except (httpx.TransportError, PrometheusStarting):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no result for {expr} after {timeout} s\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.mark.slow
def test_prometheus_scrapes_a_live_server(monitored_server, tmp_path):
    binary = require_tool("prometheus", "prometheus")
    server = monitored_server
    prom = Prometheus(binary, f"127.0.0.1:{server.port}", tmp_path)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        prom.wait_for('up{job="tokenmill"} == 1')
        # Long requests, one after another, keep a sequence running until a scrape has seen it.
        stop = threading.Event()

        def keep_busy() -> None:
            while not stop.is_set():
                httpx.post(server.base_url + "/completions", headers=headers, timeout=120,
                           json={"prompt": "count", "max_tokens": 480, "ignore_eos": True})

        busy = threading.Thread(target=keep_busy, daemon=True)
        busy.start()
        try:
            running = prom.wait_for('max_over_time(vllm:num_requests_running{job="tokenmill"}[1m]) >= 1')
        finally:
            stop.set()
            busy.join(120)
        assert running[0]["metric"]["model_name"] == "tiny"
        for feature in ("search", "search", "summarize"):
            r = httpx.post(server.base_url + "/chat/completions", headers={**headers, "X-Feature": feature},
                           timeout=60, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert r.status_code == 200, r.text

        ttft = prom.wait_for('vllm:time_to_first_token_seconds_count{job="tokenmill"} >= 4')
        assert float(ttft[0]["value"][1]) >= 4
        buckets = prom.query('vllm:time_to_first_token_seconds_bucket{job="tokenmill"}')
        assert len(buckets) > 10 and any(b["metric"]["le"] == "+Inf" for b in buckets)
        p95 = prom.wait_for('histogram_quantile(0.95, sum by (le) '
                            '(increase(vllm:time_to_first_token_seconds_bucket[5m]))) > 0')
        assert float(p95[0]["value"][1]) > 0

        cost = prom.wait_for('tokenmill:feature_cost_usd_total{feature="search"} > 0')
        gpu_seconds = prom.query('tokenmill:feature_gpu_seconds_total{feature="search"}')
        assert float(cost[0]["value"][1]) == pytest.approx(
            float(gpu_seconds[0]["value"][1]) * GPU_HOURLY_COST / 3600, rel=1e-6)
        requests = prom.wait_for('tokenmill:feature_requests_total{feature="summarize"} >= 1')
        assert requests[0]["metric"]["model_name"] == "tiny"

        # The alert rules are loaded and evaluate without errors against the live series.
        rules = httpx.get(prom.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        loaded = {r["name"]: r for g in rules for r in g["rules"]}
        assert set(loaded) == ALERTS
        deadline = time.monotonic() + 10
        while any(r.get("health") != "ok" for r in loaded.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
            rules = httpx.get(prom.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
            loaded = {r["name"]: r for g in rules for r in g["rules"]}
        assert all(r["health"] == "ok" for r in loaded.values()), loaded
    finally:
        prom.stop()
