"""`tokenmill generate` and `tokenmill chat`: offline generation from the command line."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill.sampling_params import SamplingParams


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags shared by every command that builds an engine (names as `vllm serve`): EngineArgs' fields."""
    from tokenmill.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args(parser)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) keyword arguments from the parsed engine flags (the model left out)."""
    from tokenmill.engine.arg_utils import EngineArgs

    return EngineArgs.from_cli_args(args).kwargs()


# Defaults of `generate` and `chat`: sampled text, a little nudged away from repeats. Greedy decoding of small
# models loops on the same phrase within a hundred tokens; --temperature 0 asks for it.
SAMPLING_DEFAULTS = {"max_tokens": 128, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1}


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    d = SAMPLING_DEFAULTS
    parser.add_argument("--max-tokens", type=int, default=d["max_tokens"],
                        help=f"most tokens to generate per prompt (default {d['max_tokens']})")
    parser.add_argument("--temperature", type=float, default=d["temperature"],
                        help=f"sampling temperature; 0 = greedy (default {d['temperature']})")
    parser.add_argument("--top-p", type=float, default=d["top_p"],
                        help=f"nucleus sampling: keep the most likely tokens up to this mass (default {d['top_p']})")
    parser.add_argument("--top-k", type=int, default=d["top_k"],
                        help="keep only the k most likely tokens; 0 = all (default 0)")
    parser.add_argument("--repetition-penalty", type=float, default=d["repetition_penalty"],
                        help="shrink the logits of tokens already in the prompt or output; 1 = off "
                             f"(default {d['repetition_penalty']})")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of `generate` / `chat` from their parsed flags."""
    from tokenmill import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty)


def _run_generate(args: argparse.Namespace) -> int:
    from tokenmill import LLM

    params = sampling_params(args)
    llm = LLM(args.model, **engine_kwargs(args))
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.command == "chat":
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs, strict=True):
        print(f">>> {prompt}\n{out.outputs[0].text}\n")
    return 0


def register(subparsers) -> None:
    for name, help_text in (("generate", "complete prompts with a model (offline)"),
                            ("chat", "answer user messages with the model's chat template (offline)")):
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_engine_args(parser)
        _sampling_args(parser)
        parser.add_argument("--prompt", "-p", action="append",
                            help="a prompt (repeatable); without it, one prompt per line of standard input")
        parser.set_defaults(func=_run_generate)
