"""Parameter counts and KV bytes against published figures, from the built-in catalog."""

import pytest

from tokenmill.planner import (
    MODEL_CONFIGS,
    ModelArch,
    get_model_config,
    kv_cache_bytes_per_token,
    load_arch,
    param_count,
)

# Published parameter counts (model cards / safetensors index totals).
PUBLISHED_TOTALS = {
    "Llama-3.1-8B": 8_030_261_248,
    "Llama-3.1-70B": 70_553_706_496,
    "Llama-3.1-405B": 405_853_388_800,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.2-3B": 3_212_749_824,
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-1.5B": 1_543_714_304,
    "Qwen2.5-7B": 7_615_616_512,
    "Qwen2.5-14B": 14_770_033_664,
    "Qwen2.5-32B": 32_763_876_352,
    "Qwen2.5-72B": 72_706_203_648,
    "Mistral-7B-v0.1": 7_241_732_096,
    "Mixtral-8x7B-v0.1": 46_702_792_704,
    "Mixtral-8x22B-v0.1": 140_620_634_112,
    "Phi-3-mini-4k": 3_821_079_552,
    "DeepSeek-V3": 671_026_419_200,  # main model; the 14B multi-token-prediction module is not served
    "SmolLM2-135M": 134_515_008,
}


@pytest.mark.parametrize("name,expected", sorted(PUBLISHED_TOTALS.items()))
def test_param_count_matches_published(name, expected):
    assert param_count(load_arch(name)).total == expected


def test_active_params_of_moe_models():
    # Mixtral: 2 of 8 experts per token -> 12.9B active; DeepSeek-V3: 8 of 256 routed + 1 shared -> ~37B.
    assert param_count(load_arch("Mixtral-8x7B")).active == 12_879_925_248
    ds = param_count(load_arch("DeepSeek-V3"))
    assert 37.0e9 < ds.active < 38.0e9
    qwen = param_count(load_arch("Qwen3-30B-A3B"))
    assert 30.0e9 < qwen.total < 31.0e9 and 3.0e9 < qwen.active < 3.5e9
    dense = param_count(load_arch("Llama-3.1-8B"))
    assert dense.active == dense.total


def test_breakdown_sums_to_total():
    for name in MODEL_CONFIGS:
        pc = param_count(load_arch(name))
        assert sum(pc.by_component.values()) == pc.total, name


def test_kv_bytes_per_token_published():
    assert kv_cache_bytes_per_token(load_arch("Llama-3.1-8B"), "bfloat16") == 131_072
    assert kv_cache_bytes_per_token(load_arch("Llama-3.1-70B"), "bf16") == 327_680
    # MLA caches one 512-wide latent + 64-wide rope key per layer, not 128 heads of K and V.
    assert kv_cache_bytes_per_token(load_arch("DeepSeek-V3"), "bf16") == 61 * 576 * 2


def test_gqa_is_not_multi_head():
    arch = load_arch("Llama-3.1-8B")
    naive = 2 * arch.num_layers * arch.hidden_size * 2  # what a calculator that ignores GQA says
    assert naive == 4 * kv_cache_bytes_per_token(arch)


def test_head_dim_comes_from_config_not_hidden_over_heads():
    qwen3 = load_arch("Qwen3-0.6B")  # hidden 1024 / 16 heads = 64, but head_dim is 128
    assert qwen3.head_dim == 128
    assert kv_cache_bytes_per_token(qwen3) == 28 * 2 * 8 * 128 * 2
    gemma = load_arch("Gemma-2-9B")  # 3584 / 16 = 224, head_dim is 256
    assert gemma.head_dim == 256


def test_head_dim_defaults_to_hidden_over_heads():
    cfg = get_model_config("Llama-3.1-8B")
    cfg.pop("head_dim", None)
    assert ModelArch.from_hf_config(cfg).head_dim == 128


def test_sliding_window_layers():
    mistral = load_arch("Mistral-7B-v0.1")
    assert mistral.sliding_window == 4096 and mistral.num_sliding_layers == 32
    gemma2 = load_arch("Gemma-2-27B")
    assert gemma2.sliding_window_layers == tuple(range(0, 46, 2))
    gemma3 = load_arch("Gemma-3-27B")  # 5 local layers, then 1 global
    assert gemma3.num_full_attention_layers == 62 // 6
    assert load_arch("Qwen2.5-7B").sliding_window is None  # use_sliding_window: false
    assert load_arch("Llama-3.1-8B").sliding_window is None


def test_catalog_names_are_forgiving():
    a = load_arch("meta-llama/Llama-3.1-8B-Instruct")
    assert a.name == "Llama-3.1-8B"
    assert load_arch("mixtral-8x7b").name == "Mixtral-8x7B-v0.1"
    assert load_arch("Qwen/Qwen2.5-7B-Instruct").name == "Qwen2.5-7B"


def test_unknown_catalog_name_lists_close_matches():
    with pytest.raises(ValueError, match="Llama-3.1-8B") as info:
        load_arch("Lama-3.1-8B")
    assert "close matches" in str(info.value)


def test_required_catalog_models_present():
    required = [
        "Llama-3.1-8B", "Llama-3.1-70B", "Llama-3.1-405B", "Llama-3.2-1B", "Llama-3.2-3B", "Mistral-7B",
        "Mixtral-8x7B", "Mixtral-8x22B", "Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B", "Qwen2.5-14B",
        "Qwen2.5-32B", "Qwen2.5-72B", "Qwen3-0.6B", "Qwen3-8B", "Qwen3-32B", "Qwen3-30B-A3B", "Gemma-2-9B",
        "Gemma-2-27B", "Gemma-3-27B", "Phi-3-mini", "Phi-4", "DeepSeek-V3", "SmolLM2-135M",
    ]  # fmt: skip
    for name in required:
        assert param_count(load_arch(name)).total > 0
