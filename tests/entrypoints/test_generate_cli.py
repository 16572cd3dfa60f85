"""`tokenmill generate` / `tokenmill chat`: sampling defaults a user wants, shown in --help."""

from __future__ import annotations

from tokenmill.entrypoints.cli import build_parser, main
from tokenmill.entrypoints.generate_cli import SAMPLING_DEFAULTS, sampling_params


def test_defaults_sample_a_bounded_answer_instead_of_256_greedy_tokens():
    for command in ("generate", "chat"):
        params = sampling_params(build_parser().parse_args([command, "-p", "Hello"]))
        assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (
            128, 0.7, 0.9, 0, 1.1)
        assert not params.greedy
    params = sampling_params(build_parser().parse_args(["generate", "-p", "x", "--temperature", "0",
                                                        "--max-tokens", "7", "--repetition-penalty", "1"]))
    assert params.greedy and params.max_tokens == 7 and not params.needs_penalties


def test_help_states_every_sampling_default(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["generate"]
    text = " ".join(sub.format_help().split())  # argparse wraps lines
    for value in SAMPLING_DEFAULTS.values():
        assert f"(default {value})" in text


def test_generate_prints_a_completion(llama_dir, capsys):
    assert main(["generate", str(llama_dir), "--dtype", "float32", "-p", "Hello", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(">>> Hello\n")
