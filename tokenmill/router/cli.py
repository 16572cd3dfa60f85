"""`tokenmill route --config router.yaml` and `tokenmill route report`."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "route", help="one OpenAI endpoint over model tiers and replicas (see docs/router.md)",
        description="Serve the OpenAI API in front of tokenmill (or other OpenAI-compatible) backends: feature "
                    "routing, prefix-affinity balancing, failover, quality-gated escalation, cost logs.")
    parser.add_argument("--config", help="router config file (YAML or JSON; see docs/router.md)")
    parser.add_argument("--host", default=None, help="address to bind (overrides the config's host)")
    parser.add_argument("--port", type=int, default=None, help="port (overrides the config's port)")
    parser.set_defaults(func=_route)
    sub = parser.add_subparsers(dest="route_command", metavar="SUBCOMMAND")
    report = sub.add_parser("report", help="per-feature requests, escalation rate, cost and savings from the logs")
    report.add_argument("usage_log", nargs="?", help="the router's usage log (default: the config's usage_log)")
    report.add_argument("--escalation-log", default=None, help="the escalation log (default: the config's)")
    report.add_argument("--config", dest="report_config", default=None,
                        help="take the log paths from this router config")
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report.add_argument("--plot", default=None, metavar="PNG", help="also draw cost and escalation rate per feature")
    report.set_defaults(func=_report)


def _route(args: argparse.Namespace) -> int:
    from tokenmill.router.config import load_config

    if not args.config:
        print("tokenmill route: error: --config is required (a YAML or JSON router config; see docs/router.md)",
              file=sys.stderr)
        return 2
    config = load_config(args.config)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)
    from tokenmill.router.app import run_router

    return run_router(config)


def _report(args: argparse.Namespace) -> int:
    from tokenmill.router.report import run_report

    usage_log, escalation_log = args.usage_log, args.escalation_log
    if args.report_config:
        from tokenmill.router.config import load_config

        config = load_config(args.report_config)
        usage_log = usage_log or config.usage_log
        escalation_log = escalation_log or config.escalation_log
    if not usage_log:
        print("tokenmill route report: error: give the usage log (or --config with usage_log set)", file=sys.stderr)
        return 2
    print(run_report(usage_log, escalation_log, args.json, args.plot))
    return 0
