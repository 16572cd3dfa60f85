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
    from tokenmill import __version__

    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
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


def _subcommand_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (nested) subcommand args selected: `tokenmill bench serve` -> bench serve's parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return _subcommand_parser(action.choices[chosen], args)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse reports a subcommand's unknown flags with the top-level usage; show the subcommand's.
        _subcommand_parser(parser, args).error(
            f"unrecognized arguments: {' '.join(unknown)}")
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
