"""EngineArgs: one documented list of engine arguments gives the CLI flags, LLM's keywords and EngineConfig."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from tokenmill.config import EngineConfig, default_cpu_kv_cache_bytes
from tokenmill.engine.arg_utils import EngineArgs, field_docs
from tokenmill.entrypoints.cli import build_parser


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_every_field_is_documented_and_a_flag_of_every_engine_command():
    docs = field_docs(EngineArgs)
    names = [f.name for f in dataclasses.fields(EngineArgs)]
    assert set(docs) == set(names), set(names) - set(docs)
    for command in ("serve", "generate", "chat"):
        parser = subcommand_parser(command)
        actions = {a.dest: a for a in parser._actions}
        for name in names:
            assert name in actions, (command, name)
            assert actions[name].help == docs[name]
        if command == "serve":
            assert "--engine-process" in actions["engine_process"].option_strings  # a server flag, not an engine one
    help_text = subcommand_parser("serve").format_help()
    assert "reuse KV blocks of shared prompt prefixes" in help_text and "-tp" in help_text


def test_flags_keep_their_names_and_behaviour(tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{{ messages }}")
    args = subcommand_parser("serve").parse_args([
        "some/model", "--dtype", "float32", "--max-model-len", "128", "--no-enable-prefix-caching", "-tp", "1",
        "--enforce-eager", "--pooling-type", "mean", "--batch-invariant", "--kv-cache-memory", "2GiB",
        "--structured-outputs-compile-timeout", "2.5", "--chat-template", str(template),
    ])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.model == "some/model" and engine_args.max_model_len == 128
    assert engine_args.enable_prefix_caching is False and engine_args.enforce_eager is True
    assert engine_args.pooling_type == "MEAN" and engine_args.batch_invariant is True
    assert engine_args.kv_cache_memory == "2GiB" and engine_args.structured_outputs_compile_timeout == 2.5
    config = engine_args.create_engine_config()
    assert config.model.pooling_type == "MEAN" and config.cache.enable_prefix_caching is False
    assert config.cache.kv_cache_bytes == 2 * 2**30 and config.structured_outputs.compile_timeout_s == 2.5
    assert config.model.chat_template == "{{ messages }}"  # a path is read
    with pytest.raises(SystemExit):
        subcommand_parser("serve").parse_args(["--dtype", "float8"])


def test_llm_takes_the_same_keywords():
    from tokenmill import LLM

    parameters = inspect.signature(LLM.__init__).parameters
    assert "kwargs" in parameters and "max_model_len" not in parameters  # no second list of engine arguments
    with pytest.raises(TypeError, match="unknown engine argument.*max_model_length.*max_model_len"):
        LLM("x", max_model_length=4)


def test_create_engine_config_resolves_the_defaults(monkeypatch):
    monkeypatch.delenv("TOKENMILL_BATCH_INVARIANT", raising=False)
    config = EngineArgs(device="cpu").create_engine_config()
    assert isinstance(config, EngineConfig)
    assert config.model.device == "cpu" and config.scheduler.max_num_batched_tokens == 2048
    assert config.cache.kv_cache_bytes == default_cpu_kv_cache_bytes()
    assert config.model.batch_invariant is False
    assert EngineArgs(device="cpu", max_num_batched_tokens=64).create_engine_config().scheduler \
        .max_num_batched_tokens == 64
    monkeypatch.setenv("TOKENMILL_BATCH_INVARIANT", "1")
    assert EngineConfig.from_kwargs(device="cpu").model.batch_invariant is True
    with pytest.raises(ValueError, match="max_num_seqs must be a positive integer"):
        EngineArgs(max_num_seqs=0).create_engine_config()


def test_a_new_field_is_one_line():
    """A field added to EngineArgs (and to its config) is a flag with its docstring as help, and a keyword."""

    @dataclasses.dataclass
    class Extended(EngineArgs):
        quantization: str | None = dataclasses.field(default=None, metadata={"config": ("model", "dtype")})
        """quantization method of the weights"""

    parser = argparse.ArgumentParser()
    Extended.add_cli_args(parser)
    action = next(a for a in parser._actions if a.dest == "quantization")
    assert action.option_strings == ["--quantization"] and action.help == "quantization method of the weights"
    assert next(a for a in parser._actions if a.dest == "max_num_seqs").help == "most requests in one batch"
    args = parser.parse_args(["--quantization", "float32"])
    assert Extended.from_cli_args(args).quantization == "float32"
    config = Extended.from_kwargs(None, quantization="float32", device="cpu").create_engine_config()
    assert config.model.dtype == "float32"
