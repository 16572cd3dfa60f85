"""`tokenmill plan`: table, JSON, PNG and errors."""

import argparse
import json

import pytest

from tokenmill.planner.cli import register


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="tokenmill")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table(capsys):
    code, out, _ = run(["Llama-3.1-8B", "--precision", "int4-awq", "--context", "8192", "--concurrency", "32",
                        "--gpu", "H100"], capsys)  # fmt: skip
    assert code == 0
    assert "Llama-3.1-8B" in out and "H100-SXM" in out and "int4-awq" in out
    assert "tok/s/GPU" in out and "memory per device" in out


def test_all_gpus_by_default(capsys):
    code, out, _ = run(["Qwen2.5-7B"], capsys)
    assert code == 0
    for name in ("H200", "A100-40GB", "L4", "RTX-4090", "MI300X"):
        assert name in out
    assert "best fit" in out


def test_json_has_the_breakdown(capsys):
    code, out, _ = run(["Mixtral-8x7B", "--json", "--gpu", "H100,A100", "--api-price", "0.5"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["model"]["params_total"] == 46_702_792_704
    memory = data["gpus"][0]["memory"]
    for key in ("weights", "kv_cache", "activations", "overhead", "total", "budget"):
        assert key in memory
    assert data["gpus"][0]["cost"]["break_even"]["requests_per_day"] > 0


def test_plot_writes_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "memory.png"
    code, _, err = run(["Llama-3.1-70B", "--precision", "fp8", "--plot", str(path)], capsys)
    assert code == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in err


def test_lists(capsys):
    code, out, _ = run(["--list-models"], capsys)
    assert code == 0 and "DeepSeek-V3" in out
    code, out, _ = run(["--list-gpus"], capsys)
    assert code == 0 and "MI300X" in out and "2025" in out


def test_errors_exit_2_with_a_message(capsys):
    code, _, err = run(["Lama-3.1-8B"], capsys)
    assert code == 2 and "close matches" in err and "Llama-3.1-8B" in err
    code, _, err = run(["Llama-3.1-8B", "--gpu", "H1OO"], capsys)
    assert code == 2 and "unknown GPU" in err
    code, _, err = run(["Llama-3.1-8B", "--tp", "3", "--gpu", "L4"], capsys)
    assert code == 2 and "tensor_parallel_size=3" in err
    code, _, err = run([], capsys)
    assert code == 2 and "MODEL" in err


def test_config_json_model(capsys, tmp_path):
    from tokenmill.planner import get_model_config

    (tmp_path / "config.json").write_text(json.dumps(get_model_config("Qwen3-8B")))
    code, out, _ = run([str(tmp_path), "--gpu", "L4", "--context", "2048"], capsys)
    assert code == 0 and "qwen3" in out
