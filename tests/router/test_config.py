"""The router config: a bad config exits 2 with a message naming the key and the problem."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml

from tokenmill.router.config import ConfigError, load_config, parse_config

GOOD = {
    "backends": {
        "local-small": {"urls": ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"], "model": "small",
                        "price": {"gpu_hourly": 2.99}},
        "cloud-mid": {"urls": ["https://api.example.com/v1"], "model": "mid", "health_path": None,
                      "price": {"input_per_1m": 0.15, "output_per_1m": 0.60}},
    },
    "routes": [
        {"name": "classify", "match": {"feature": "classify-intent"}, "backend": "local-small", "max_tokens": 64,
         "escalate": {"to": "cloud-mid", "when": [{"check": "choice", "values": ["refund", "cancel", "other"]},
                                                  {"check": "min_mean_logprob", "value": -1.5}]}},
        {"name": "default", "match": {"model": "*"}, "backend": "local-small", "fallback": ["cloud-mid"]},
    ],
    "balancing": "prefix",
    "escalation_log": "escalations.jsonl",
    "usage_log": "router-usage.jsonl",
}


def test_the_issue_example_parses(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    config = load_config(path)
    assert config.balancing.policy == "prefix"
    assert config.backends["local-small"].price.gpu_hourly == 2.99
    assert config.backends["cloud-mid"].health_path is None
    route = config.route_by_name("classify")
    assert route.feature == "classify-intent" and route.max_tokens == 64
    assert [c.check for c in route.escalate.when] == ["choice", "min_mean_logprob"]
    json_path = tmp_path / "router.json"
    json_path.write_text(json.dumps(GOOD))
    assert load_config(json_path) == config


def _with(change) -> dict:
    data = copy.deepcopy(GOOD)
    change(data)
    return data


BAD = [
    (lambda d: d["routes"][0].update(backend="nope"), "routes[0].backend", "unknown backend 'nope'"),
    (lambda d: d["routes"][0]["escalate"].update(to="local-small"), "routes[0].escalate.to", "own backend"),
    (lambda d: d["routes"][0]["escalate"]["when"][0].update(check="vibes"), "routes[0].escalate.when[0].check",
     "unknown check"),
    (lambda d: d["routes"][0]["escalate"]["when"][1].pop("value"), "routes[0].escalate.when[1].value", "required"),
    (lambda d: d["routes"][0]["escalate"]["when"].append({"check": "regex", "pattern": "("}),
     "routes[0].escalate.when[2].pattern", "regular expression"),
    (lambda d: d["routes"][0]["escalate"]["when"].append({"check": "python", "callable": "no.such.module.fn"}),
     "routes[0].escalate.when[2].callable", "cannot be loaded"),
    (lambda d: d["backends"]["local-small"].update(urls=["ftp://x/v1"]), "backends.local-small.urls[0]", "http"),
    (lambda d: d["backends"]["local-small"].update(urls=["http://x:1/api"]), "backends.local-small.urls[0]",
     "/v1"),
    (lambda d: d["backends"]["local-small"].update(price={"gpu_hourly": -1}), "backends.local-small.price.gpu_hourly",
     ">= 0"),
    (lambda d: d["backends"]["local-small"].update(price={"gpu_hourly": 1, "input_per_1m": 1}),
     "backends.local-small.price", "not both"),
    (lambda d: d["backends"]["cloud-mid"].update(api_key_env="TOKENMILL_NO_SUCH_ENV_VAR"),
     "backends.cloud-mid.api_key_env", "not set"),
    (lambda d: d["backends"]["local-small"].update(launch={"model": "m"}), "backends.local-small",
     "exactly one of 'urls'"),
    (lambda d: d.update(balancing="random"), "balancing", "unknown policy 'random'"),
    (lambda d: d.update(colour="blue"), "colour", "unknown key"),
    (lambda d: d["routes"][1].update(max_tokens=0), "routes[1].max_tokens", ">= 1"),
    (lambda d: d["routes"][1].update(match={"model": "*", "feature": "x"}), "routes[1].match", "exactly one"),
    (lambda d: d["routes"].append({"name": "classify", "match": {"model": "m"}, "backend": "cloud-mid"}),
     "routes[2].name", "used twice"),
    (lambda d: d["routes"].append({"name": "again", "match": {"model": "*"}, "backend": "cloud-mid"}),
     "routes[2].match", "already matched"),
    (lambda d: d.update(health={"interval_s": 0}), "health.interval_s", "> 0"),
    (lambda d: d.update(routes=[]), "routes", "non-empty"),
]


@pytest.mark.parametrize(("change", "key", "problem"), BAD)
def test_bad_config_names_the_key(change, key, problem):
    with pytest.raises(ConfigError) as e:
        parse_config(_with(change), "router.yaml")
    assert e.value.key == key, str(e.value)
    assert problem in str(e.value) and str(e.value).startswith("router.yaml: " + key)


def test_cli_exits_2_naming_the_key(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(_with(lambda d: d["routes"][0].update(backend="nope"))))
    out = subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "route", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "routes[0].backend" in out.stderr and "unknown backend 'nope'" in out.stderr
    path.write_text("backends: [unclosed")
    out = subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "route", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not valid YAML" in out.stderr
    out = subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "route"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "--config is required" in out.stderr
