"""Configuration of the HTTP server (the engine's is tokenmill.config.EngineConfig), and the api-keys file.

api-keys file (JSON):

    {
      "keys": [
        {"name": "web-app", "key": "sk-web-...", "requests_per_minute": 600, "tokens_per_minute": 200000},
        {"name": "batch", "key_sha256": "<hex sha256 of the key>"}
      ],
      "features": {
        "summarize": {"requests_per_minute": 60, "tokens_per_minute": 100000}
      }
    }

A key without its own limits gets --rate-limit-requests-per-minute / --rate-limit-tokens-per-minute.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# Feature tags become Prometheus label values and usage-log fields: keep them short and plain.
FEATURE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")


def check_feature(feature: str) -> str:
    if not isinstance(feature, str) or not FEATURE_PATTERN.fullmatch(feature):
        raise ValueError(
            f"feature tag {feature!r} is invalid: use 1 to 64 characters from letters, digits and _ . : / - "
            "(starting with a letter or digit)"
        )
    return feature


@dataclass(frozen=True)
class RateLimit:
    # None: unlimited.
    requests_per_minute: int | None = None
    # Prompt tokens + max_tokens x n of each request, reserved on arrival; unused output is given back.
    tokens_per_minute: int | None = None

    def validate(self, where: str) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{where}: {name} must be a positive integer (or absent for no limit), got {value!r}")

    @property
    def is_unlimited(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None


@dataclass(frozen=True)
class ApiKey:
    name: str
    # sha256 of the key: keys are compared by digest, in constant time.
    key_sha256: bytes
    # None: the server's default limit.
    rate_limit: RateLimit | None = None


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ServerConfig:
    # Address to bind; 0.0.0.0 listens on every interface (as vllm serve).
    host: str = "0.0.0.0"
    port: int = 8000
    # Names the model answers to; the first is reported in responses. Empty: the model path (or default name).
    served_model_names: tuple[str, ...] = ()
    # Accepted API keys; empty: no authentication.
    api_keys: tuple[ApiKey, ...] = ()
    # Limit of each key without its own (of all requests together when no key is configured).
    default_rate_limit: RateLimit = field(default_factory=RateLimit)
    # feature tag -> its limit, over all keys.
    feature_rate_limits: dict[str, RateLimit] = field(default_factory=dict)
    # Hard cap on max_tokens (None: only max_model_len bounds it).
    max_tokens_limit: int | None = None
    # max_tokens of a chat request that sets none (completions default to 16, as OpenAI's).
    default_max_tokens: int = 1024
    # Most requests waiting for the engine before new ones get 503 (None: unbounded).
    max_queue_len: int | None = None
    # JSON-lines file receiving one usage record per finished request (None: off).
    usage_log: str | None = None
    # USD per GPU-hour, for cost_usd in the usage log and metrics.
    gpu_hourly_cost: float = 0.0
    # Seconds in-flight requests get to finish after SIGTERM before they are aborted.
    shutdown_timeout: float = 30.0
    # Seconds between the stats log lines (0: off).
    log_stats_interval: float = 10.0
    # Most prompts in one /v1/completions request, and most choices (n x prompts) one request may ask for.
    max_prompts_per_request: int = 256
    max_choices_per_request: int = 256
    # Largest request body accepted (413 over it), in bytes. None: derived from max_model_len
    # (default_max_request_body_bytes).
    max_request_body_bytes: int | None = None
    # Seconds a client gets to send a request's headers (from connecting, or from the end of the previous
    # response); then the connection is closed. Slow-header clients cannot hold connections open forever.
    header_read_timeout: float = 10.0
    # CORS (as vllm serve): origins allowed to call the API from a browser (empty: no CORS headers), and the
    # methods, headers and credentials those origins may use.
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    uvicorn_log_level: str = "info"
    disable_uvicorn_access_log: bool = False
    # Run the engine core in its own process (the server's event loop and the engine then do not share one
    # interpreter, and an engine crash cannot take the server down with it); False: in a thread of this process.
    engine_process: bool = True
    # OTLP/HTTP collector receiving one span per request (None: no tracing). See tokenmill/metrics/tracing.py.
    otlp_traces_endpoint: str | None = None
    # Tool calling (vLLM's flags): the parser of the model's tool-call format (tool_parsers/, e.g. "hermes"),
    # and whether tool_choice "auto" is served (it needs the parser).
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_tokens_limit", "max_queue_len", "max_request_body_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer (or unset), got {value}")
        for name in ("max_prompts_per_request", "max_choices_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.header_read_timeout <= 0:
            raise ValueError(f"header_read_timeout must be > 0 seconds, got {self.header_read_timeout}")
        if self.allow_credentials and "*" in self.allowed_origins:
            raise ValueError("allow_credentials needs explicit allowed_origins: browsers refuse credentials with "
                             "the origin '*'")
        if self.usage_log is not None:
            check_usage_log(self.usage_log)
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.gpu_hourly_cost < 0:
            raise ValueError(f"gpu_hourly_cost must be >= 0 (USD per hour), got {self.gpu_hourly_cost}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.log_stats_interval < 0:
            raise ValueError(f"log_stats_interval must be >= 0 seconds (0 turns it off), got {self.log_stats_interval}")
        self.default_rate_limit.validate("the default rate limit")
        for feature, limit in self.feature_rate_limits.items():
            check_feature(feature)
            limit.validate(f"the rate limit of feature {feature!r}")
        if self.otlp_traces_endpoint is not None:
            from tokenmill.metrics.tracing import check_otel_installed, traces_url

            traces_url(self.otlp_traces_endpoint)
            check_otel_installed()
        if self.tool_call_parser is not None:
            from tokenmill.entrypoints.openai.tool_parsers import get_tool_parser

            get_tool_parser(self.tool_call_parser)
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME (the model's tool-call "
                             "format, e.g. hermes or llama3_json)")
        names = [k.name for k in self.api_keys]
        if len(set(names)) != len(names):
            raise ValueError(f"API key names must be unique, got {names}")
        digests = [k.key_sha256 for k in self.api_keys]
        if len(set(digests)) != len(digests):
            raise ValueError("the same API key is configured twice: give each key one entry")


# A full-context prompt's JSON: a few bytes per token as text or as ids; 64 leaves room for escapes (\u00e9 is
# 6 bytes) and long tokens, and 1 MiB for small models' batches of prompts.
REQUEST_BODY_BYTES_PER_TOKEN = 64
MIN_REQUEST_BODY_BYTES = 1 << 20


def default_max_request_body_bytes(max_model_len: int) -> int:
    """The request-body limit when --max-request-body-bytes is not given."""
    return max(MIN_REQUEST_BODY_BYTES, REQUEST_BODY_BYTES_PER_TOKEN * max_model_len)


def check_usage_log(path: str | Path) -> None:
    """Refuse a usage-log path the server could not append to, before the server starts."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--usage-log {path} is a directory: give a file path, e.g. {path / 'usage.jsonl'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--usage-log {path}: {parent} is not a directory")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise ValueError(f"--usage-log {path}: {target} is not writable")


def parse_feature_limit(spec: str) -> tuple[str, RateLimit]:
    """'FEATURE=RPM[:TPM]' (an empty number is unlimited) -> (feature, RateLimit)."""
    feature, sep, numbers = spec.partition("=")
    fields = numbers.split(":")
    if not sep or len(fields) > 2 or not all(f == "" or f.isdigit() for f in fields):
        raise ValueError(
            f"--feature-rate-limit {spec!r}: use FEATURE=REQUESTS_PER_MINUTE[:TOKENS_PER_MINUTE], e.g. search=60:20000"
        )
    values = [int(f) if f else None for f in fields] + [None]
    limit = RateLimit(requests_per_minute=values[0], tokens_per_minute=values[1])
    check_feature(feature)
    limit.validate(f"--feature-rate-limit {spec!r}")
    return feature, limit


def load_api_keys_file(path: str | Path) -> tuple[list[ApiKey], dict[str, RateLimit]]:
    """The keys and per-feature limits of an api-keys file (format in this module's docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"api-keys file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"api-keys file {path} is not valid JSON ({e}): see docs/server.md for the format") from e
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
        raise ValueError(f"api-keys file {path}: expected an object with a 'keys' list (see docs/server.md)")
    unknown = set(data) - {"keys", "features"}
    if unknown:
        raise ValueError(f"api-keys file {path}: unknown fields {sorted(unknown)}; allowed: 'keys', 'features'")
    keys = []
    for i, entry in enumerate(data.get("keys", [])):
        where = f"api-keys file {path}, keys[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object with 'name' and 'key' (or 'key_sha256')")
        extra = set(entry) - {"name", "key", "key_sha256", "requests_per_minute", "tokens_per_minute"}
        if extra:
            raise ValueError(f"{where}: unknown fields {sorted(extra)}")
        name = entry.get("name", f"key-{i}")
        if ("key" in entry) == ("key_sha256" in entry):
            raise ValueError(f"{where}: give exactly one of 'key' (the key text) or 'key_sha256' (its hex digest)")
        if "key" in entry:
            if not isinstance(entry["key"], str) or not entry["key"]:
                raise ValueError(f"{where}: 'key' must be a non-empty string")
            digest = hash_key(entry["key"])
        else:
            try:
                digest = bytes.fromhex(entry["key_sha256"])
            except (TypeError, ValueError):
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"{where}: 'key_sha256' must be 64 hex digits (sha256 of the key)")
        limit = None
        if "requests_per_minute" in entry or "tokens_per_minute" in entry:
            limit = RateLimit(entry.get("requests_per_minute"), entry.get("tokens_per_minute"))
            limit.validate(where)
        keys.append(ApiKey(str(name), digest, limit))
    features = {}
    raw_features = data.get("features", {})
    if not isinstance(raw_features, dict):
        raise ValueError(f"api-keys file {path}: 'features' must map feature tags to limits")
    for feature, entry in raw_features.items():
        where = f"api-keys file {path}, features[{feature!r}]"
        if not isinstance(entry, dict) or set(entry) - {"requests_per_minute", "tokens_per_minute"}:
            raise ValueError(f"{where}: expected {{'requests_per_minute': N, 'tokens_per_minute': N}}")
        check_feature(feature)
        limit = RateLimit(entry.get("requests_per_minute"), entry.get("tokens_per_minute"))
        limit.validate(where)
        features[feature] = limit
    return keys, features
