"""The OpenAI-compatible HTTP server (`tokenmill serve`).

A request's path through this package:
    api_server.py       thin FastAPI routes, middleware (auth, draining), error handlers, process lifecycle
    protocol.py         pydantic request/response models (the OpenAPI schema comes from them)
    serving_*.py        the logic of each endpoint: validate, build SamplingParams, call the engine, format
    auth.py, rate_limit.py   API keys and per-key / per-feature rate limits
    errors.py           OpenAIError and the {"error": {...}} shape
    server_config.py    ServerConfig (validated) and the api-keys file format
    cli_args.py         the `serve` subcommand and its flags
"""
