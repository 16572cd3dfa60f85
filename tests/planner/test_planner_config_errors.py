"""Bad input fails with a ValueError that names the problem and the fix."""

import json

import pytest

from tokenmill.planner import (
    ModelArch,
    get_gpu,
    get_model_config,
    kv_cache_bytes_per_token,
    load_arch,
    load_gpu_catalog,
    normalize_dtype,
    parse_precision,
)

REQUIRED = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "model_type",
]


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_field_is_named(field):
    cfg = get_model_config("Llama-3.1-8B")
    del cfg[field]
    with pytest.raises(ValueError, match=f"'{field}'"):
        ModelArch.from_hf_config(cfg)


def test_missing_moe_field_is_named():
    cfg = get_model_config("Mixtral-8x7B")
    del cfg["num_experts_per_tok"]
    with pytest.raises(ValueError, match="'num_experts_per_tok'"):
        ModelArch.from_hf_config(cfg)


def test_missing_mla_field_is_named():
    cfg = get_model_config("DeepSeek-V3")
    del cfg["qk_rope_head_dim"]
    with pytest.raises(ValueError, match="'qk_rope_head_dim'"):
        ModelArch.from_hf_config(cfg)


def test_missing_field_from_a_file(tmp_path):
    cfg = get_model_config("Qwen2.5-7B")
    del cfg["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'vocab_size'"):
        load_arch(str(tmp_path))


def test_heads_not_divisible():
    cfg = get_model_config("Llama-3.1-8B") | {"num_key_value_heads": 5}
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelArch.from_hf_config(cfg)


def test_bad_tensor_parallel_size_lists_valid_ones():
    arch = load_arch("Llama-3.1-8B")
    with pytest.raises(ValueError, match=r"use one of 1, 2, 4, 8"):
        kv_cache_bytes_per_token(arch, "bf16", tensor_parallel_size=3)


def test_unknown_dtype_and_precision():
    with pytest.raises(ValueError, match="unknown dtype"):
        normalize_dtype("bfloat17")
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        parse_precision("int3")


def test_unknown_gpu_lists_close_matches():
    with pytest.raises(ValueError, match="H100"):
        get_gpu("H10")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_arch(str(tmp_path))


def test_invalid_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_arch(str(path))


def test_gpu_catalog_file_overrides_and_adds(tmp_path):
    path = tmp_path / "gpus.json"
    path.write_text(
        json.dumps(
            {
                "gpus": {
                    "H100": {"on_demand_per_hour": 2.0, "price_date": "2030-01-01"},
                    "B200": {
                        "memory_gib": 179,
                        "bandwidth_gbps": 8000,
                        "bf16_tflops": 2250,
                        "on_demand_per_hour": 5,
                    },
                }
            }
        )
    )
    catalog = load_gpu_catalog(path)
    assert catalog["H100-SXM"].on_demand_per_hour == 2.0
    assert catalog["H100-SXM"].price_date == "2030-01-01"
    assert catalog["H100-SXM"].memory_gib == 79.2  # untouched fields kept
    assert get_gpu("b200", catalog).bandwidth_gbps == 8000


def test_gpu_catalog_toml_and_errors(tmp_path):
    path = tmp_path / "gpus.toml"
    path.write_text("[gpus.L4]\nspot_per_hour = 0.2\n")
    assert load_gpu_catalog(path)["L4"].spot_per_hour == 0.2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"X1": {"memory_gib": 10}}))
    with pytest.raises(ValueError, match="bandwidth_gbps"):
        load_gpu_catalog(bad)
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"L4": {"memory": 10}}))
    with pytest.raises(ValueError, match="unknown fields"):
        load_gpu_catalog(typo)
    eff = tmp_path / "eff.json"
    eff.write_text(json.dumps({"L4": {"bandwidth_efficiency": 1.5}}))
    with pytest.raises(ValueError, match="roofline"):
        load_gpu_catalog(eff)
