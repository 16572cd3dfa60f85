"""The `tokenmill` command: serve, generate, chat, plan, bench."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules adding a subcommand through register(subparsers), in --help order.
_SUBCOMMAND_MODULES = (
    "tokenmill.entrypoints.openai.cli_args",
    "tokenmill.entrypoints.generate_cli",
    "tokenmill.planner.cli",
    "tokenmill.benchmarks.cli",
    "tokenmill.router.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenmill",
        description="LLM inference engine (OpenAI-compatible server, offline generation) and capacity planner.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"tokenmill {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
