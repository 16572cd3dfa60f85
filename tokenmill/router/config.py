"""The router's configuration (router.yaml or .json), validated into frozen dataclasses.

Every problem raises ConfigError naming the key (`routes[1].escalate.to`) and what is wrong with it; the CLI turns
it into exit status 2. Every key is documented in docs/router.md.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tokenmill.entrypoints.openai.server_config import RateLimit, check_feature

BALANCING_POLICIES = ("prefix", "least_outstanding", "round_robin")
CHECK_KINDS = ("json_schema", "choice", "regex", "min_mean_logprob", "not_truncated", "python")


class ConfigError(ValueError):
    """A router config problem: `key` is the path of the offending key."""

    def __init__(self, key: str, problem: str, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Price:
    # USD per million tokens (an API priced per token).
    input_per_1m: float = 0.0
    output_per_1m: float = 0.0
    # USD per GPU-hour (a tokenmill backend): cost = gpu_seconds (from the usage block) x gpu_hourly / 3600.
    gpu_hourly: float | None = None


@dataclass(frozen=True)
class LaunchConfig:
    # Model path (or GGUF file) given to `tokenmill serve`.
    model: str
    # Extra `tokenmill serve` arguments.
    args: tuple[str, ...] = ()
    # Number of replicas (processes) to start, each on its own free port.
    replicas: int = 1
    # Directory receiving one log file per replica (None: the router's own stderr).
    log_dir: str | None = None
    # Seconds a crashed replica waits before it is restarted (doubles on repeated crashes, up to 30 s).
    restart_delay_s: float = 1.0


@dataclass(frozen=True)
class BackendConfig:
    name: str
    # Base URLs ending in /v1, one per replica (empty when `launch` starts them).
    urls: tuple[str, ...]
    # Model name sent to the backend.
    model: str
    api_key_env: str | None = None
    price: Price = field(default_factory=Price)
    launch: LaunchConfig | None = None
    # Path probed for health, relative to the URL without /v1 (None: no active probes; an ejected replica then
    # comes back after health.eject_s).
    health_path: str | None = "/health"

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


@dataclass(frozen=True)
class CheckConfig:
    check: str
    # choice: the accepted answers.
    values: tuple[str, ...] = ()
    # regex: the pattern the whole answer must match (re.fullmatch).
    pattern: str | None = None
    # min_mean_logprob: the lowest accepted mean token logprob.
    value: float | None = None
    # json_schema: a schema of its own (else the request's response_format schema).
    schema: dict | None = None
    # python: "package.module.function" (or "package.module:function"), called as fn(request, response).
    callable: str | None = None


@dataclass(frozen=True)
class EscalateConfig:
    to: str
    when: tuple[CheckConfig, ...]


@dataclass(frozen=True)
class RouteConfig:
    name: str
    backend: str
    # Exactly one of feature / model; model "*" matches everything.
    feature: str | None = None
    model: str | None = None
    fallback: tuple[str, ...] = ()
    # Hard cap on max_tokens (requests over it get 400; requests without it get it).
    max_tokens: int | None = None
    # Most prompt tokens (counted by the backend's /tokenize).
    max_input_tokens: int | None = None
    escalate: EscalateConfig | None = None


@dataclass(frozen=True)
class BalancingConfig:
    policy: str = "prefix"
    # Characters of the rendered prompt per hashed block.
    block_chars: int = 256
    # Prefix affinity gives way to the least loaded replica when the preferred one has more than this many
    # more outstanding requests.
    load_threshold: int = 4
    # Block hashes remembered (least recently used are forgotten).
    table_size: int = 65536


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 2.0
    timeout_s: float = 2.0
    # Consecutive passed probes that re-admit an ejected replica.
    healthy_after: int = 1
    # Consecutive failed probes that eject a replica.
    unhealthy_after: int = 1
    # Without active probes: seconds an ejected replica stays out.
    eject_s: float = 10.0


@dataclass(frozen=True)
class TimeoutConfig:
    connect_s: float = 2.0
    # Seconds a backend may stay silent: until its first byte (a non-streaming answer's first byte comes when it
    # is complete; failover is still possible until then), and between two chunks of a stream.
    read_s: float = 300.0


@dataclass(frozen=True)
class RouterConfig:
    backends: dict[str, BackendConfig]  # name -> backend
    routes: tuple[RouteConfig, ...]
    balancing: BalancingConfig = field(default_factory=BalancingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    escalation_log: str | None = None
    usage_log: str | None = None
    # Whether the escalation log keeps the cheap tier's answer, and how many characters of it.
    log_outputs: bool = True
    max_output_chars: int = 2000
    # API keys and per-feature limits: the file format of `tokenmill serve --api-keys-file`.
    api_keys_file: str | None = None
    # Limit of each key without its own (of all requests when there are no keys).
    rate_limit: RateLimit = field(default_factory=RateLimit)
    # feature tag -> limit, over all keys (added to the key file's "features").
    feature_rate_limits: dict[str, RateLimit] = field(default_factory=dict)
    host: str = "0.0.0.0"
    port: int = 8000

    def route_by_name(self, name: str) -> RouteConfig:
        return next(r for r in self.routes if r.name == name)


# ---- parsing -------------------------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, source: str | None) -> None:
        self.source = source

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(key, problem, self.source)

    def mapping(self, value: Any, key: str, allowed: set[str], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping with keys {sorted(allowed)}, got {_show(value)}")
        unknown = set(value) - allowed
        if unknown:
            raise self.error(f"{key}.{sorted(unknown)[0]}" if key else sorted(unknown)[0],
                             f"unknown key; allowed here: {sorted(allowed)}")
        for name in required:
            if name not in value:
                raise self.error(_join(key, name), "is required")
        return value

    def number(self, value: Any, key: str, minimum: float = 0.0, strict: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, got {_show(value)}")
        if value < minimum or (strict and value == minimum):
            raise self.error(key, f"must be {'>' if strict else '>='} {minimum:g}, got {value}")
        return float(value)

    def integer(self, value: Any, key: str, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {_show(value)}")
        if value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, got {_show(value)}")
        return value

    def strings(self, value: Any, key: str) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, list):
            raise self.error(key, f"must be a list of strings, got {_show(value)}")
        return tuple(self.string(v, f"{key}[{i}]") for i, v in enumerate(value))

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_show(value)}")
        return value

    def rate_limit(self, value: Any, key: str) -> RateLimit:
        m = self.mapping(value, key, {"requests_per_minute", "tokens_per_minute"})
        limit = RateLimit(*(None if m.get(n) is None else self.integer(m[n], f"{key}.{n}")
                            for n in ("requests_per_minute", "tokens_per_minute")))
        return limit


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _check_url(reader: _Reader, url: str, key: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise reader.error(key, f"must be an http(s) URL such as http://127.0.0.1:8001/v1, got {url!r}")
    if not parts.path.rstrip("/").endswith("/v1"):
        raise reader.error(key, f"must end in /v1 (the OpenAI base URL), got {url!r}")
    return url.rstrip("/")


def _parse_price(r: _Reader, value: Any, key: str) -> Price:
    m = r.mapping(value, key, {"gpu_hourly", "input_per_1m", "output_per_1m"})
    if "gpu_hourly" in m and ({"input_per_1m", "output_per_1m"} & set(m)):
        raise r.error(key, "give either gpu_hourly or input_per_1m/output_per_1m, not both")
    if "gpu_hourly" in m:
        return Price(gpu_hourly=r.number(m["gpu_hourly"], f"{key}.gpu_hourly"))
    return Price(input_per_1m=r.number(m.get("input_per_1m", 0.0), f"{key}.input_per_1m"),
                 output_per_1m=r.number(m.get("output_per_1m", 0.0), f"{key}.output_per_1m"))


def _parse_backend(r: _Reader, name: str, value: Any) -> BackendConfig:
    key = f"backends.{name}"
    m = r.mapping(value, key, {"urls", "model", "api_key_env", "price", "launch", "health_path"})
    if ("urls" in m) == ("launch" in m):
        raise r.error(key, "give exactly one of 'urls' (running servers) or 'launch' (servers the router starts)")
    launch = None
    urls: tuple[str, ...] = ()
    if "urls" in m:
        urls = tuple(_check_url(r, u, f"{key}.urls[{i}]") for i, u in enumerate(r.strings(m["urls"], f"{key}.urls")))
        if not urls:
            raise r.error(f"{key}.urls", "must list at least one URL")
        if len(set(urls)) != len(urls):
            raise r.error(f"{key}.urls", "lists the same URL twice")
        if "model" not in m:
            raise r.error(f"{key}.model", "is required (the model name sent to the backend)")
    else:
        lk = f"{key}.launch"
        lm = r.mapping(m["launch"], lk, {"model", "args", "replicas", "log_dir", "restart_delay_s"}, ("model",))
        launch = LaunchConfig(
            model=r.string(lm["model"], f"{lk}.model"),
            args=r.strings(lm.get("args", []), f"{lk}.args"),
            replicas=r.integer(lm.get("replicas", 1), f"{lk}.replicas"),
            log_dir=r.string(lm["log_dir"], f"{lk}.log_dir") if lm.get("log_dir") is not None else None,
            restart_delay_s=r.number(lm.get("restart_delay_s", 1.0), f"{lk}.restart_delay_s"),
        )
        for flag in ("--host", "--port"):
            if any(a == flag or a.startswith(flag + "=") for a in launch.args):
                raise r.error(f"{lk}.args", f"must not set {flag}: the router picks the address of each replica")
    # A launched backend answers to its model path unless `model` names it (then passed as --served-model-name).
    model = r.string(m["model"], f"{key}.model") if "model" in m else launch.model  # type: ignore[union-attr]
    api_key_env = r.string(m["api_key_env"], f"{key}.api_key_env") if m.get("api_key_env") is not None else None
    if api_key_env is not None and api_key_env not in os.environ:
        raise r.error(f"{key}.api_key_env", f"environment variable {api_key_env!r} is not set")
    health_path = m.get("health_path", "/health")
    if health_path is not None and (not isinstance(health_path, str) or not health_path.startswith("/")):
        raise r.error(f"{key}.health_path", f"must be a path starting with '/' (or null), got {_show(health_path)}")
    price = _parse_price(r, m["price"], f"{key}.price") if "price" in m else Price()
    return BackendConfig(name, urls, model, api_key_env, price, launch, health_path)


def _parse_check(r: _Reader, value: Any, key: str) -> CheckConfig:
    if not isinstance(value, dict) or "check" not in value:
        raise r.error(key, f"expected a mapping with 'check' (one of {list(CHECK_KINDS)}), got {_show(value)}")
    kind = value["check"]
    extra = {"choice": {"values"}, "regex": {"pattern"}, "min_mean_logprob": {"value"}, "json_schema": {"schema"},
             "not_truncated": set(), "python": {"callable"}}
    if kind not in extra:
        raise r.error(f"{key}.check", f"unknown check {kind!r}; use one of {list(CHECK_KINDS)}")
    m = r.mapping(value, key, {"check"} | extra[kind])
    if kind == "choice":
        values = r.strings(m.get("values"), f"{key}.values")
        if not values:
            raise r.error(f"{key}.values", "must list at least one accepted answer")
        return CheckConfig(kind, values=values)
    if kind == "regex":
        pattern = r.string(m.get("pattern"), f"{key}.pattern")
        try:
            re.compile(pattern)
        except re.error as e:
            raise r.error(f"{key}.pattern", f"is not a valid regular expression: {e}") from None
        return CheckConfig(kind, pattern=pattern)
    if kind == "min_mean_logprob":
        if "value" not in m:
            raise r.error(f"{key}.value", "is required (the lowest accepted mean logprob, e.g. -1.5)")
        return CheckConfig(kind, value=r.number(m["value"], f"{key}.value", minimum=float("-inf")))
    if kind == "json_schema":
        schema = m.get("schema")
        if schema is not None:
            if not isinstance(schema, dict):
                raise r.error(f"{key}.schema", f"must be a JSON schema object, got {_show(schema)}")
            import jsonschema

            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as e:
                raise r.error(f"{key}.schema", f"is not a valid JSON schema: {e.message}") from None
        return CheckConfig(kind, schema=schema)
    if kind == "python":
        path = r.string(m.get("callable"), f"{key}.callable")
        try:
            resolve_callable(path)
        except (ImportError, AttributeError, ValueError) as e:
            raise r.error(f"{key}.callable", f"cannot be loaded: {e}") from None
        return CheckConfig(kind, callable=path)
    return CheckConfig(kind)


def resolve_callable(path: str):
    """'pkg.mod.fn' or 'pkg.mod:fn' -> the callable."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not a dotted path such as 'mypkg.evals.check_answer'")
    fn = getattr(importlib.import_module(module_name), attr)
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn


def _parse_route(r: _Reader, value: Any, i: int, backends: dict[str, BackendConfig]) -> RouteConfig:
    key = f"routes[{i}]"
    m = r.mapping(value, key, {"name", "match", "backend", "fallback", "max_tokens", "max_input_tokens", "escalate"},
                  ("name", "match", "backend"))
    name = r.string(m["name"], f"{key}.name")
    match = r.mapping(m["match"], f"{key}.match", {"feature", "model"})
    if len(match) != 1:
        raise r.error(f"{key}.match", "give exactly one of {feature: TAG} or {model: NAME} ({model: '*'} matches all)")
    feature = model = None
    if "feature" in match:
        feature = r.string(match["feature"], f"{key}.match.feature")
        try:
            check_feature(feature)
        except ValueError as e:
            raise r.error(f"{key}.match.feature", str(e)) from None
    else:
        model = r.string(match["model"], f"{key}.match.model")

    def backend_ref(v: Any, k: str) -> str:
        b = r.string(v, k)
        if b not in backends:
            raise r.error(k, f"unknown backend {b!r}; defined backends: {sorted(backends)}")
        return b

    backend = backend_ref(m["backend"], f"{key}.backend")
    fallback = tuple(backend_ref(b, f"{key}.fallback[{j}]")
                     for j, b in enumerate(r.strings(m.get("fallback", []), f"{key}.fallback")))
    escalate = None
    if m.get("escalate") is not None:
        ek = f"{key}.escalate"
        em = r.mapping(m["escalate"], ek, {"to", "when"}, ("to", "when"))
        to = backend_ref(em["to"], f"{ek}.to")
        if to == backend:
            raise r.error(f"{ek}.to", f"is the route's own backend {backend!r}: escalate to a stronger tier")
        if not isinstance(em["when"], list) or not em["when"]:
            raise r.error(f"{ek}.when", "must be a non-empty list of checks")
        escalate = EscalateConfig(to, tuple(_parse_check(r, c, f"{ek}.when[{j}]") for j, c in enumerate(em["when"])))
    return RouteConfig(
        name=name, backend=backend, feature=feature, model=model, fallback=fallback,
        max_tokens=r.integer(m["max_tokens"], f"{key}.max_tokens") if m.get("max_tokens") is not None else None,
        max_input_tokens=(r.integer(m["max_input_tokens"], f"{key}.max_input_tokens")
                          if m.get("max_input_tokens") is not None else None),
        escalate=escalate,
    )


TOP_KEYS = {"backends", "routes", "balancing", "health", "timeouts", "escalation_log", "usage_log", "log_outputs",
            "max_output_chars", "api_keys_file", "rate_limit", "feature_rate_limits", "host", "port"}


def parse_config(data: Any, source: str | None = None) -> RouterConfig:
    r = _Reader(source)
    m = r.mapping(data, "", TOP_KEYS, ("backends", "routes"))
    if not isinstance(m["backends"], dict) or not m["backends"]:
        raise r.error("backends", "must map backend names to {urls | launch, model, price}")
    backends = {}
    for name, value in m["backends"].items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            raise r.error(f"backends.{name}", "backend names use letters, digits and _ . - (up to 64)")
        backends[name] = _parse_backend(r, name, value)
    if not isinstance(m["routes"], list) or not m["routes"]:
        raise r.error("routes", "must be a non-empty list of routes")
    routes = tuple(_parse_route(r, v, i, backends) for i, v in enumerate(m["routes"]))
    names = [rt.name for rt in routes]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise r.error(f"routes[{i}].name", f"route name {name!r} is used twice")
    for i, rt in enumerate(routes):
        key = ("feature", rt.feature) if rt.feature else ("model", rt.model)
        for j in range(i):
            other = routes[j]
            if (("feature", other.feature) if other.feature else ("model", other.model)) == key:
                raise r.error(f"routes[{i}].match", f"{key[0]} {key[1]!r} is already matched by route {other.name!r}")

    balancing = BalancingConfig()
    if "balancing" in m:
        b = m["balancing"]
        if isinstance(b, str):
            b = {"policy": b}
        bm = r.mapping(b, "balancing", {"policy", "block_chars", "load_threshold", "table_size"})
        policy = bm.get("policy", "prefix")
        if policy not in BALANCING_POLICIES:
            raise r.error("balancing.policy" if isinstance(m["balancing"], dict) else "balancing",
                          f"unknown policy {policy!r}; use one of {list(BALANCING_POLICIES)}")
        balancing = BalancingConfig(
            policy=policy,
            block_chars=r.integer(bm.get("block_chars", 256), "balancing.block_chars"),
            load_threshold=r.integer(bm.get("load_threshold", 4), "balancing.load_threshold", minimum=0),
            table_size=r.integer(bm.get("table_size", 65536), "balancing.table_size"),
        )
    health = HealthConfig()
    if "health" in m:
        hm = r.mapping(m["health"], "health", {"interval_s", "timeout_s", "healthy_after", "unhealthy_after",
                                               "eject_s"})
        health = HealthConfig(
            interval_s=r.number(hm.get("interval_s", 2.0), "health.interval_s", strict=True),
            timeout_s=r.number(hm.get("timeout_s", 2.0), "health.timeout_s", strict=True),
            healthy_after=r.integer(hm.get("healthy_after", 1), "health.healthy_after"),
            unhealthy_after=r.integer(hm.get("unhealthy_after", 1), "health.unhealthy_after"),
            eject_s=r.number(hm.get("eject_s", 10.0), "health.eject_s"),
        )
    timeouts = TimeoutConfig()
    if "timeouts" in m:
        tm = r.mapping(m["timeouts"], "timeouts", {"connect_s", "read_s"})
        timeouts = TimeoutConfig(*(r.number(tm.get(n, d), f"timeouts.{n}", strict=True) for n, d in
                                   (("connect_s", 2.0), ("read_s", 300.0))))
    feature_limits = {}
    if m.get("feature_rate_limits") is not None:
        fl = m["feature_rate_limits"]
        if not isinstance(fl, dict):
            raise r.error("feature_rate_limits", "must map feature tags to {requests_per_minute, tokens_per_minute}")
        for f, v in fl.items():
            feature_limits[str(f)] = r.rate_limit(v, f"feature_rate_limits.{f}")
    api_keys_file = m.get("api_keys_file")
    if api_keys_file is not None:
        api_keys_file = r.string(api_keys_file, "api_keys_file")
        if source is not None and not os.path.isabs(api_keys_file):
            api_keys_file = str(Path(source).parent / api_keys_file)
    port = r.integer(m.get("port", 8000), "port", minimum=0)
    if port > 65535:
        raise r.error("port", f"must be in [0, 65535], got {port}")

    def opt_path(name: str) -> str | None:
        return r.string(m[name], name) if m.get(name) is not None else None

    return RouterConfig(
        backends=backends, routes=routes, balancing=balancing, health=health, timeouts=timeouts,
        escalation_log=opt_path("escalation_log"), usage_log=opt_path("usage_log"),
        log_outputs=r.boolean(m.get("log_outputs", True), "log_outputs"),
        max_output_chars=r.integer(m.get("max_output_chars", 2000), "max_output_chars", minimum=0),
        api_keys_file=api_keys_file,
        rate_limit=r.rate_limit(m["rate_limit"], "rate_limit") if m.get("rate_limit") is not None else RateLimit(),
        feature_rate_limits=feature_limits, host=r.string(m.get("host", "0.0.0.0"), "host"), port=port,
    )


def load_config(path: str | Path) -> RouterConfig:
    """Read and validate a YAML or JSON config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError("(file)", f"not valid JSON: {e}", str(path)) from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError("(file)", f"not valid YAML: {e}", str(path)) from None
    return parse_config(data, str(path))
