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


def test_json_reports_tp_communication_and_pipeline_stages(capsys):
    code, out, _ = run(["Llama-3.1-8B", "--json", "--gpu", "H100", "--tp", "2", "--pipeline-parallel-size", "2",
                        "--precision", "bf16", "--concurrency", "4"], capsys)  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["pipeline_parallel_size"] == 2
    g = data["gpus"][0]
    assert (g["tensor_parallel_size"], g["pipeline_parallel_size"], g["num_gpus"]) == (2, 2, 4)
    comm = g["tp_communication"]
    assert comm["num_tokens"] == 4 and comm["num_all_reduces"] == 65
    assert comm["bytes_sent_per_gpu"] == 4 * (65 * 8192 + 256512 / 2)
    for key in ("bandwidth_time_s", "latency_time_s", "time_s", "memory_time_s", "ratio_to_memory_time",
                "dominates", "dominates_batches", "interconnect", "interconnect_gbps"):  # fmt: skip
        assert key in comm
    pipe = g["pipeline"]
    assert [s["layers"] for s in pipe["stages"]] == [[0, 16], [16, 32]]
    assert pipe["decode_bytes_per_boundary"] == 4 * 2 * 4096 * 2
    assert g["memory"]["pipeline_stage"] == 1 and g["memory"]["stage_layers"] == [16, 32]


def test_text_reports_tp_communication_and_pipeline_stages(capsys):
    code, out, _ = run(["Llama-3.1-8B", "--gpu", "L40S", "--tp", "4", "--pp", "2"], capsys)
    assert code == 0
    assert "tensor parallel x4, decode step of 16 tokens: 65 all-reduces" in out
    assert "on PCIe 4.0 x16 (32 GB/s per direction)" in out and "memory time" in out
    assert "pipeline x2: layers per stage 0-15 +embed" in out and "16-31 +head" in out
    assert "between stages per rank" in out
    # One device: no collectives to report.
    code, out, _ = run(["Llama-3.1-8B", "--gpu", "H100", "--tp", "1"], capsys)
    assert code == 0 and "all-reduces" not in out and "pipeline x" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pp", "33"], "pipeline_parallel_size=33 exceeds the model's 32 layers"),
        (["--pp", "0"], "pipeline_parallel_size must be a positive integer"),
        (["--pp", "2", "--emit", "helm-values"], "drop --pipeline-parallel-size"),
    ],
)
def test_pipeline_errors(argv, message, capsys):
    code, _, err = run(["Llama-3.1-8B", "--gpu", "H100", *argv], capsys)
    assert code == 2 and message in err


def test_markdown(capsys):
    code, out, _ = run(["Llama-3.1-8B", "--markdown", "--gpu", "H100", "--tp", "2", "--pp", "2"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "### `tokenmill plan`: Llama-3.1-8B"
    header = next(i for i, line in enumerate(lines) if line.startswith("| GPU |"))
    assert lines[header].split(" | ")[1:3] == ["TP", "PP"]
    assert set(lines[header + 1]) <= set("|:-")
    assert lines[header + 2].startswith("| H100-SXM | 2 | 2 | yes |")
    assert "#### H100-SXM x2, 2 pipeline stages (fits)" in lines  # asked for by --gpu: no "best fit" suffix
    assert any(line.startswith("- tensor parallel x2, decode step of 16 tokens") for line in lines)
    assert any(line.startswith("  - on NVLink 4 (450 GB/s per direction)") for line in lines)
    assert any(line.startswith("- pipeline x2: layers per stage 0-15 +embed") for line in lines)


def test_json_and_markdown_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        run(["Llama-3.1-8B", "--json", "--markdown"], capsys)
