"""Supported architectures and the decoder settings read from a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# model_type -> (q/k/v projections have bias, q/k RMSNorm per head)
_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}

SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)


@dataclass(frozen=True)
class DecoderSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_window: int | None
    hidden_act: str

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> DecoderSpec:
        model_type = config.get("model_type")
        if model_type not in _ARCHITECTURES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported; tokenmill runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} models"
            )

        def need(name: str) -> Any:
            if config.get(name) is None:
                raise ValueError(f"{source}: required field {name!r} is missing")
            return config[name]

        qkv_bias, qk_norm = _ARCHITECTURES[model_type]
        attention_bias = bool(config.get("attention_bias", False))
        if model_type in ("llama", "mistral", "qwen3") and attention_bias:
            qkv_bias = True
        if config.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        hidden_act = config.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"{source}: hidden_act {hidden_act!r} is not supported (only 'silu')")
        num_heads = int(need("num_attention_heads"))
        hidden_size = int(need("hidden_size"))
        head_dim = config.get("head_dim") or hidden_size // num_heads
        sliding_window = config.get("sliding_window")
        if model_type == "qwen2" and not config.get("use_sliding_window", False):
            sliding_window = None
        if model_type == "qwen3" and not config.get("use_sliding_window", False):
            sliding_window = None
        # Checkpoints write rope_theta + rope_scaling; transformers >= 5 writes both into rope_parameters.
        rope_parameters = config.get("rope_parameters") or {}
        rope_theta = config.get("rope_theta", rope_parameters.get("rope_theta", 10000.0))
        rope_scaling = config.get("rope_scaling")
        if rope_scaling is None and rope_parameters.get("rope_type", "default") != "default":
            rope_scaling = rope_parameters
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        layer_types = config.get("layer_types")
        if layer_types and "sliding_attention" in layer_types:
            if len(set(layer_types)) > 1:
                raise ValueError(
                    f"{source}: models mixing sliding-window and full-attention layers are not supported yet"
                )
        elif layer_types:
            sliding_window = None
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type not in ("default", "llama3", "linear"):
                raise ValueError(
                    f"{source}: rope_scaling type {rope_type!r} is not supported (default, llama3, linear)"
                )
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden_size,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=attention_bias and model_type != "qwen2",
            qk_norm=qk_norm,
            sliding_window=int(sliding_window) if sliding_window else None,
            hidden_act=hidden_act,
        )
