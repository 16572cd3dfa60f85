"""`tokenmill plan ... --emit helm-values`: a values file sized by the plan, or a refusal with the reason."""

import argparse

import pytest
import yaml

from tokenmill.planner import load_arch, weight_bytes
from tokenmill.planner.cli import register
from tokenmill.planner.helm import HOST_MEMORY_HEADROOM_GIB, tier_name, to_yaml


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="tokenmill")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def tier_of(text: str) -> dict:
    values = yaml.safe_load(text)
    (tier,) = values["servingEngineSpec"]["modelSpec"]
    return tier


def test_h100_values(capsys):
    code, out, _ = run(["Llama-3.1-8B", "--gpu", "H100", "--context", "8192", "--concurrency", "32",
                        "--emit", "helm-values"], capsys)
    assert code == 0
    assert out.startswith("# Helm values for deploy/helm/tokenmill")
    tier = tier_of(out)
    assert tier["name"] == "llama-3-1-8b" and tier["servedModelName"] == "Llama-3.1-8B"
    assert tier["engine"] == {"tensorParallelSize": 1, "gpuMemoryUtilization": 0.9, "maxModelLen": 8192,
                              "maxNumSeqs": 32}
    assert tier["gpu"] == {"count": 1, "type": "H100-SXM", "resourceName": "nvidia.com/gpu"}
    # One copy of the weights (15.0 GiB of bf16) plus the runtime headroom, rounded up.
    weights_gib = weight_bytes(load_arch("Llama-3.1-8B"), "auto", 1).total / 2**30
    assert tier["resources"]["requests"]["memory"] == f"{int(weights_gib + HOST_MEMORY_HEADROOM_GIB) + 1}Gi"
    assert tier["resources"]["limits"]["memory"] == tier["resources"]["requests"]["memory"]
    assert "shmSize" not in tier  # one process, no tensor-parallel workers


def test_tensor_parallel_when_one_gpu_is_too_small(capsys, tmp_path):
    out_file = tmp_path / "values.yaml"
    code, out, err = run(["Llama-3.1-8B", "--gpu", "L40S", "--context", "8192", "--concurrency", "32",
                          "--gpu-memory-utilization", "0.85", "--emit", "helm-values", "--output",
                          str(out_file)], capsys)
    assert code == 0 and out == "" and f"wrote {out_file}" in err
    tier = tier_of(out_file.read_text())
    assert tier["engine"]["tensorParallelSize"] == tier["gpu"]["count"] == 2
    assert tier["engine"]["gpuMemoryUtilization"] == 0.85
    assert tier["resources"]["requests"]["cpu"] == "8"
    assert tier["shmSize"] == "8Gi"
    assert tier["gpuHourlyCost"] > 0


def test_cheapest_fitting_gpu_without_gpu_flag(capsys):
    code, out, _ = run(["Qwen2.5-7B", "--context", "4096", "--concurrency", "8", "--emit", "helm-values"], capsys)
    assert code == 0
    assert tier_of(out)["gpu"]["count"] >= 1


def test_refuses_when_nothing_fits(capsys):
    code, out, err = run(["Llama-3.1-70B", "--gpu", "L4", "--tp", "1", "--context", "8192", "--emit",
                          "helm-values"], capsys)
    assert code == 2 and out == ""
    assert "does not fit" in err and "L4: weights + activations + overhead need" in err
    # Too many sequences is a refusal too (the planner's "partial"), naming how many fit.
    code, out, err = run(["Llama-3.1-8B", "--gpu", "L4", "--context", "8192", "--concurrency", "400",
                          "--emit", "helm-values"], capsys)
    assert code == 2 and out == "" and "sequences of 8192 tokens fit" in err


def test_output_needs_emit(capsys):
    code, _, err = run(["Llama-3.1-8B", "--output", "x.yaml"], capsys)
    assert code == 2 and "--output goes with --emit helm-values" in err


@pytest.mark.parametrize(("name", "expected"), [("meta-llama/Llama-3.1-8B-Instruct", "llama-3-1-8b-instruct"),
                                                ("Qwen2.5_7B", "qwen2-5-7b"), ("---", "model")])
def test_tier_name(name, expected):
    assert tier_name(name) == expected


def test_yaml_writer_round_trips():
    data = {"a": [{"b": 1, "c": ["x", "y"]}, {"d": {"e": None}}], "f": "a: b", "g": [], "h": {}, "i": 0.5}
    assert yaml.safe_load(to_yaml(data)) == data
