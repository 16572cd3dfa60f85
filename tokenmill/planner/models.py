"""Built-in catalog of popular open models, stored as the values of their published config.json.

Only the fields the planner reads are kept. Instruct/chat variants share their base model's architecture, so
"Llama-3.1-8B-Instruct" and "meta-llama/Llama-3.1-8B" resolve to the same entry.
"""

from __future__ import annotations

import copy
import difflib
import re
from typing import Any


def _llama(
    hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int = 128256, **extra: Any
) -> dict:
    cfg = {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": "bfloat16",
    }
    cfg.update(extra)
    return cfg


def _qwen2(
    hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool, max_pos: int
) -> dict:
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": tied,
        "use_sliding_window": False,
        "sliding_window": max_pos,
        "max_window_layers": layers,
        "torch_dtype": "bfloat16",
    }


def _qwen3(hidden: int, inter: int, layers: int, heads: int, kv: int, tied: bool, **extra: Any) -> dict:
    cfg = {
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
    }
    cfg.update(extra)
    return cfg


MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # Meta Llama 3.1 / 3.2
    "Llama-3.1-8B": _llama(4096, 14336, 32, 32, 8),
    "Llama-3.1-70B": _llama(8192, 28672, 80, 64, 8),
    "Llama-3.1-405B": _llama(16384, 53248, 126, 128, 8),
    "Llama-3.2-1B": _llama(2048, 8192, 16, 32, 8, head_dim=64, tie_word_embeddings=True),
    "Llama-3.2-3B": _llama(3072, 8192, 28, 24, 8, head_dim=128, tie_word_embeddings=True),
    # Mistral AI
    "Mistral-7B-v0.1": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "Mistral-7B-v0.3": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32768,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "Mixtral-8x7B-v0.1": {
        "model_type": "mixtral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "Mixtral-8x22B-v0.1": {
        "model_type": "mixtral",
        "hidden_size": 6144,
        "intermediate_size": 16384,
        "num_hidden_layers": 56,
        "num_attention_heads": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 32000,
        "max_position_embeddings": 65536,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    # Qwen 2.5
    "Qwen2.5-0.5B": _qwen2(896, 4864, 24, 14, 2, 151936, True, 32768),
    "Qwen2.5-1.5B": _qwen2(1536, 8960, 28, 12, 2, 151936, True, 131072),
    "Qwen2.5-7B": _qwen2(3584, 18944, 28, 28, 4, 152064, False, 131072),
    "Qwen2.5-14B": _qwen2(5120, 13824, 48, 40, 8, 152064, False, 131072),
    "Qwen2.5-32B": _qwen2(5120, 27648, 64, 40, 8, 152064, False, 131072),
    "Qwen2.5-72B": _qwen2(8192, 29568, 80, 64, 8, 152064, False, 131072),
    # Qwen 3
    "Qwen3-0.6B": _qwen3(1024, 3072, 28, 16, 8, True),
    "Qwen3-8B": _qwen3(4096, 12288, 36, 32, 8, False),
    "Qwen3-32B": _qwen3(5120, 25600, 64, 64, 8, False),
    "Qwen3-30B-A3B": _qwen3(
        2048,
        6144,
        48,
        32,
        4,
        False,
        model_type="qwen3_moe",
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    # Google Gemma
    "Gemma-2-9B": {
        "model_type": "gemma2",
        "hidden_size": 3584,
        "intermediate_size": 14336,
        "num_hidden_layers": 42,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "vocab_size": 256000,
        "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    },
    "Gemma-2-27B": {
        "model_type": "gemma2",
        "hidden_size": 4608,
        "intermediate_size": 36864,
        "num_hidden_layers": 46,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "head_dim": 128,
        "vocab_size": 256000,
        "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    "Gemma-3-27B": {
        "model_type": "gemma3",
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 5376,
            "intermediate_size": 21504,
            "num_hidden_layers": 62,
            "num_attention_heads": 32,
            "num_key_value_heads": 16,
            "head_dim": 128,
            "vocab_size": 262208,
            "max_position_embeddings": 131072,
            "rope_theta": 1000000.0,
            "sliding_window": 1024,
            "sliding_window_pattern": 6,
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 896,
        },
    },
    # Microsoft Phi
    "Phi-3-mini-4k": {
        "model_type": "phi3",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "sliding_window": 2047,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "Phi-4": {
        "model_type": "phi3",
        "hidden_size": 5120,
        "intermediate_size": 17920,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 10,
        "vocab_size": 100352,
        "max_position_embeddings": 16384,
        "rope_theta": 250000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    # DeepSeek
    "DeepSeek-V3": {
        "model_type": "deepseek_v3",
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "moe_layer_freq": 1,
        "topk_method": "noaux_tc",
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "vocab_size": 129280,
        "max_position_embeddings": 163840,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
    },
    # Hugging Face SmolLM2 (the model bundled with tokenmill as a GGUF)
    "SmolLM2-135M": _llama(
        576,
        1536,
        30,
        9,
        3,
        vocab=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
}

# Extra spellings -> catalog name
_ALIASES = {
    "mistral-7b": "Mistral-7B-v0.1",
    "mixtral-8x7b": "Mixtral-8x7B-v0.1",
    "mixtral-8x22b": "Mixtral-8x22B-v0.1",
    "phi-3-mini": "Phi-3-mini-4k",
    "phi-3-mini-4k": "Phi-3-mini-4k",
    "gemma-3-27b": "Gemma-3-27B",
    "deepseek-v3": "DeepSeek-V3",
    "deepseek-r1": "DeepSeek-V3",
}

_SUFFIXES = ("-instruct", "-it", "-chat", "-base", "-hf")


def _normalize(name: str) -> str:
    key = name.strip().lower().split("/")[-1]
    key = key.replace("_", "-").replace(" ", "-")
    key = re.sub(r"^meta-(?=llama)", "", key)
    for suffix in _SUFFIXES:
        key = key.removesuffix(suffix)
    key = re.sub(r"-instruct-(v0\.\d)$", r"-\1", key)  # Mistral-7B-Instruct-v0.3
    return key


_INDEX: dict[str, str] = {_normalize(k): k for k in MODEL_CONFIGS}
_INDEX.update(_ALIASES)


def list_models() -> list[str]:
    """Names of the catalog's models."""
    return list(MODEL_CONFIGS)


def resolve_model_name(name: str) -> str:
    """Map a user spelling (any case, org prefix, -Instruct suffix) to a catalog name.

    Raises ValueError listing the closest catalog names when nothing matches.
    """
    key = _normalize(name)
    if key in _INDEX:
        return _INDEX[key]
    close = difflib.get_close_matches(key, list(_INDEX), n=4, cutoff=0.5)
    suggestions = list(dict.fromkeys(_INDEX[c] for c in close))
    raise ValueError(
        f"unknown model {name!r}: not a catalog name, a config.json, a model directory or a .gguf file"
        + (f"; close matches: {', '.join(suggestions)}" if suggestions else "")
        + " (list the catalog with `tokenmill plan --list-models`)"
    )


def get_model_config(name: str) -> dict[str, Any]:
    """A copy of the catalog entry's config.json values."""
    return copy.deepcopy(MODEL_CONFIGS[resolve_model_name(name)])
