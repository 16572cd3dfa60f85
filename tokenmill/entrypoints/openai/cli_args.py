"""`tokenmill serve [MODEL]`: the engine flags (named as `vllm serve`) and the server's own."""

from __future__ import annotations

import argparse
import json
import os

from tokenmill.entrypoints.generate_cli import add_engine_args
from tokenmill.entrypoints.openai.server_config import (
    REQUEST_BODY_BYTES_PER_TOKEN,
    ApiKey,
    RateLimit,
    ServerConfig,
    hash_key,
    load_api_keys_file,
    parse_feature_limit,
)

API_KEY_ENV = "TOKENMILL_API_KEY"


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default, unless its help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and "default" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _list_arg(value: str) -> list[str]:
    """One value, or a JSON list of them (vllm serve --allowed-origins '["http://a", "http://b"]')."""
    if value.startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{value!r} is not a JSON list of strings ({e})") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise argparse.ArgumentTypeError(f"{value!r} is not a JSON list of strings")
        return items
    return [value]


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients send in 'model'; the first is reported in responses "
                        "(default: the model argument, or HuggingFaceTB/SmolLM2-135M-Instruct)")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    g.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per HTTP request")
    g.add_argument("--allowed-origins", action="extend", type=_list_arg, default=None, metavar="ORIGIN",
                   help="CORS: origin allowed to call the API from a browser, e.g. http://localhost:3000 or '*' "
                        "(repeatable, or a JSON list as vllm serve takes; default: none, no CORS headers)")
    g.add_argument("--allowed-methods", action="extend", type=_list_arg, default=None, metavar="METHOD",
                   help="CORS: HTTP methods those origins may use (repeatable or a JSON list; default: '*')")
    g.add_argument("--allowed-headers", action="extend", type=_list_arg, default=None, metavar="HEADER",
                   help="CORS: request headers those origins may send (repeatable or a JSON list; default: '*')")
    g.add_argument("--allow-credentials", action="store_true",
                   help="CORS: let those origins send cookies and Authorization (needs explicit origins, not '*')")
    g.add_argument("--header-read-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="close a connection that has not sent a request's headers this long after connecting "
                        "(or after its previous response)")
    g.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine core in a child process: the HTTP server and the engine do not share one "
                        "interpreter, and if the engine dies /health turns 503, requests in flight end with an "
                        "error and the server exits 1 (--no-engine-process: a thread of the server's process)")
    g.add_argument("--log-stats-interval", type=float, default=10.0, metavar="SECONDS",
                   help="log throughput, running/waiting requests, KV cache usage and prefix hit rate this often "
                        "while busy (0: never)")

    g = parser.add_argument_group("guardrails")
    g.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes and /tokenize (repeatable; also read "
                        f"from ${API_KEY_ENV}). /health and /metrics stay open")
    g.add_argument("--api-keys-file", default=None, metavar="PATH",
                   help="JSON file of named keys with their own rate limits, and per-feature limits "
                        "(format in docs/server.md)")
    g.add_argument("--rate-limit-requests-per-minute", type=int, default=None, metavar="N",
                   help="requests per minute of each API key without its own limit (without keys: of all "
                        "clients together); over it: 429 with Retry-After")
    g.add_argument("--rate-limit-tokens-per-minute", type=int, default=None, metavar="N",
                   help="tokens (prompt + max_tokens x n, unused output given back) per minute of each API key "
                        "without its own limit")
    g.add_argument("--feature-rate-limit", action="append", default=None, metavar="FEATURE=RPM[:TPM]",
                   help="limit of one feature tag (X-Feature header or metadata.feature) over all keys, e.g. "
                        "search=60:20000 (repeatable)")
    g.add_argument("--max-tokens-limit", type=int, default=None, metavar="N",
                   help="hard cap on max_tokens: a request asking for more gets 400")
    g.add_argument("--default-max-tokens", type=int, default=1024, metavar="N",
                   help="max_tokens of a chat request that sets none (capped by --max-tokens-limit and the "
                        "context left); completions default to 16 as OpenAI's")
    g.add_argument("--max-queue-len", type=int, default=None, metavar="N",
                   help="when N requests are waiting for the engine, new ones get 503 with Retry-After "
                        "(default: unbounded)")
    g.add_argument("--max-request-body-bytes", type=int, default=None, metavar="BYTES",
                   help="largest request body accepted; larger ones get 413 before they are read (default: "
                        f"{REQUEST_BODY_BYTES_PER_TOKEN} bytes per token of --max-model-len, at least 1 MiB)")
    g.add_argument("--max-prompts-per-request", type=int, default=256, metavar="N",
                   help="most prompts in one /v1/completions request (a list prompt); more get 400")
    g.add_argument("--max-choices-per-request", type=int, default=256, metavar="N",
                   help="most choices (n x prompts) one request may ask for; more get 400")
    g.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="after SIGTERM, how long requests in flight may take to finish before they are aborted")

    g = parser.add_argument_group("tool calling")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="serve tool_choice 'auto': the model chooses between text and tool calls (needs "
                        "--tool-call-parser)")
    g.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="the model's tool-call format, to read calls from its output and constrain them: "
                        "hermes (Hermes, Qwen 2.5+) or llama3_json (Llama 3.x)")

    g = parser.add_argument_group("cost metering")
    g.add_argument("--usage-log", default=None, metavar="PATH",
                   help="append one JSON line per finished request (tokens, gpu_seconds, cost_usd, feature...)")
    g.add_argument("--gpu-hourly-cost", type=float, default=0.0, metavar="USD",
                   help="price of the GPU per hour; cost_usd = USD / 3600 x the request's gpu_seconds")

    g = parser.add_argument_group("tracing")
    g.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                   help="send one OpenTelemetry span per request (GenAI attributes, feature, gpu_seconds, cost) "
                        "to this OTLP/HTTP collector, e.g. http://otel-collector:4318; an incoming W3C "
                        "traceparent is continued. Needs: pip install \"tokenmill[otel]\"")


def server_config(args: argparse.Namespace) -> ServerConfig:
    keys = []
    cli_keys = list(args.api_key or [])
    if not cli_keys and os.environ.get(API_KEY_ENV):
        cli_keys.append(os.environ[API_KEY_ENV])
    for i, key in enumerate(cli_keys):
        keys.append(ApiKey(name="default" if i == 0 else f"default-{i}", key_sha256=hash_key(key)))
    feature_limits = {}
    if args.api_keys_file:
        file_keys, feature_limits = load_api_keys_file(args.api_keys_file)
        keys.extend(file_keys)
    for spec in args.feature_rate_limit or []:
        feature, limit = parse_feature_limit(spec)
        feature_limits[feature] = limit
    config = ServerConfig(
        host=args.host,
        port=args.port,
        served_model_names=tuple(args.served_model_name or ()),
        api_keys=tuple(keys),
        default_rate_limit=RateLimit(args.rate_limit_requests_per_minute, args.rate_limit_tokens_per_minute),
        feature_rate_limits=feature_limits,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        max_queue_len=args.max_queue_len,
        usage_log=args.usage_log,
        gpu_hourly_cost=args.gpu_hourly_cost,
        shutdown_timeout=args.shutdown_timeout,
        log_stats_interval=args.log_stats_interval,
        max_request_body_bytes=args.max_request_body_bytes,
        max_prompts_per_request=args.max_prompts_per_request,
        max_choices_per_request=args.max_choices_per_request,
        header_read_timeout=args.header_read_timeout,
        allowed_origins=tuple(args.allowed_origins or ()),
        allowed_methods=tuple(args.allowed_methods or ("*",)),
        allowed_headers=tuple(args.allowed_headers or ("*",)),
        allow_credentials=args.allow_credentials,
        uvicorn_log_level=args.uvicorn_log_level,
        disable_uvicorn_access_log=args.disable_uvicorn_access_log,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        engine_process=args.engine_process,
    )
    config.validate()
    return config


def engine_config(args: argparse.Namespace):
    """(EngineConfig, chat template text) from the engine flags, built as LLM(...) builds it."""
    import dataclasses

    from tokenmill.engine.arg_utils import EngineArgs, resolve_chat_template

    engine_args = EngineArgs.from_cli_args(args)
    # The server applies the chat template itself (passed to apply_chat_template), so the engine gets none.
    chat_template = resolve_chat_template(engine_args.chat_template)
    config = dataclasses.replace(engine_args, chat_template=None).create_engine_config()
    return config, chat_template


def _run_serve(args: argparse.Namespace) -> int:
    from tokenmill.model.default_model import DEFAULT_MODEL_NAME, prepare_model

    config, chat_template = engine_config(args)
    server = server_config(args)
    if args.model is not None and not os.path.exists(os.path.expanduser(args.model)):
        # Raises FileNotFoundError naming the path or hub id, before the port opens; downloads a hub id.
        prepare_model(args.model, args.revision, args.download_dir)
    names = list(server.served_model_names) or [args.model or DEFAULT_MODEL_NAME]

    from tokenmill.entrypoints.openai.api_server import run_server

    return run_server(server, config, names, chat_template)


def register(subparsers) -> None:
    description = (
        "Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models), "
        "with /health, /metrics (Prometheus), /tokenize and /detokenize. Any OpenAI client pointed at "
        "http://HOST:PORT/v1 works."
    )
    parser = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                                   description=description, formatter_class=_HelpFormatter)
    add_engine_args(parser)
    add_server_args(parser)
    parser.set_defaults(func=_run_serve)
