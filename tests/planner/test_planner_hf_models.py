"""The planner's count equals the tensors a real checkpoint stores, for tiny random models of each family."""

import math
from pathlib import Path

import pytest

from tokenmill.planner import (
    kv_cache_bytes_per_sequence,
    kv_cache_bytes_per_token_per_layer,
    load_arch,
    param_count,
)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (config class, model class, overrides)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama_tied_bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=64, tie_word_embeddings=False)),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3_tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=32),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48
        ),
    ),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=32, sliding_window=64)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=32, sliding_window=64)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict()),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            num_key_value_heads=4,
        ),
    ),
}
# The four families the engine serves must always be covered; others are skipped on transformers versions
# that lack them.
REQUIRED = {"llama", "llama_tied_bias", "mistral", "qwen2_tied", "qwen2", "qwen3_tied", "qwen3"}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """name -> (directory, model) for every case this transformers version can build."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for name, (config_cls, model_cls, overrides) in CASES.items():
        if not hasattr(transformers, config_cls) or not hasattr(transformers, model_cls):
            assert name not in REQUIRED, f"transformers lacks {model_cls}"
            continue
        config = getattr(transformers, config_cls)(**{**BASE, **overrides})
        model = getattr(transformers, model_cls)(config).eval()
        path = root / name
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (path, model)
    return out


def stored_numel(path: Path) -> int:
    """Sum of numel over every tensor in the directory's safetensors files (a tied lm_head is not stored)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


@pytest.mark.parametrize("name", list(CASES))
def test_param_count_equals_stored_tensors(saved_models, name):
    if name not in saved_models:
        pytest.skip(f"transformers {transformers.__version__} cannot build {name}")
    path, _ = saved_models[name]
    arch = load_arch(str(path))
    assert param_count(arch).total == stored_numel(path)


def test_config_json_path_works_like_directory(saved_models):
    path, _ = saved_models["qwen3"]
    assert load_arch(str(path / "config.json")) == load_arch(str(path))


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral", "gemma2"])
def test_kv_bytes_equal_a_real_cache(saved_models, name):
    """Run the model and compare with the KV tensors transformers keeps."""
    path, model = saved_models[name]
    arch = load_arch(str(path))
    num_tokens = 100
    ids = torch.randint(3, 256, (1, num_tokens))
    with torch.no_grad():
        cache = model.to(torch.bfloat16)(ids, use_cache=True).past_key_values
    layers = cache.layers if hasattr(cache, "layers") else None
    if layers is None:
        pytest.skip("this transformers version has no per-layer cache objects")
    stored = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    planned = kv_cache_bytes_per_sequence(arch, num_tokens, "bfloat16")
    if arch.sliding_window is None:
        assert planned == stored
    else:
        # A sliding layer needs the window (including the token being decoded) while attending; transformers
        # drops the oldest of those right after, so it may hold one token fewer per sliding layer.
        slack = arch.num_sliding_layers * kv_cache_bytes_per_token_per_layer(arch, "bfloat16")
        assert stored <= planned <= stored + slack
