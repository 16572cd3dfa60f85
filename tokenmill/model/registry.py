"""Supported architectures, and the engine's model spec built from the planner's ModelArch.

config.json and GGUF metadata are parsed in one place, tokenmill/planner/arch.py; DecoderSpec only checks that
the engine runs what ModelArch describes and keeps the numbers the model code needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.planner.arch import ModelArch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ROPE_TYPES = ("default", "llama3", "linear")


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
    # Size of the attention window of the layers in sliding_window_layers (the others attend to everything).
    sliding_window: int | None
    hidden_act: str
    sliding_window_layers: tuple[int, ...] = ()

    def layer_sliding_window(self, layer: int) -> int | None:
        """The attention window of decoder layer `layer`, None for full attention."""
        return self.sliding_window if layer in self.sliding_window_layers else None

    @classmethod
    def from_arch(cls, arch: ModelArch, source: str = "config.json") -> DecoderSpec:
        """The spec of a model the engine runs; ValueError naming what is not supported otherwise."""
        if arch.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {arch.model_type!r} is not supported; tokenmill runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} models"
            )
        unsupported = [
            (arch.is_moe, "mixture-of-experts layers are"),
            (arch.is_mla, "multi-head latent attention is"),
            (arch.vision_params > 0, "multimodal checkpoints (a vision tower) are"),
            (arch.mlp_bias, "mlp_bias=true is"),
        ]
        for present, what in unsupported:
            if present:
                raise ValueError(f"{source}: {what} not supported")
        if arch.hidden_act != "silu":
            raise ValueError(f"{source}: hidden_act {arch.hidden_act!r} is not supported (only 'silu')")
        rope_scaling = arch.rope_scaling
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type not in _ROPE_TYPES:
                raise ValueError(
                    f"{source}: rope_scaling type {rope_type!r} is not supported ({', '.join(_ROPE_TYPES)})"
                )
        return cls(
            model_type=arch.model_type,
            vocab_size=arch.vocab_size,
            hidden_size=arch.hidden_size,
            intermediate_size=arch.intermediate_size,
            num_layers=arch.num_layers,
            num_heads=arch.num_attention_heads,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            rms_norm_eps=arch.rms_norm_eps,
            rope_theta=arch.rope_theta if arch.rope_theta is not None else 10000.0,
            rope_scaling=rope_scaling,
            max_position_embeddings=arch.max_position_embeddings,
            tie_word_embeddings=arch.tie_word_embeddings,
            qkv_bias=arch.qkv_bias,
            o_bias=arch.o_bias,
            qk_norm=arch.qk_norm,
            sliding_window=arch.sliding_window if arch.sliding_window_layers else None,
            hidden_act=arch.hidden_act,
            sliding_window_layers=arch.sliding_window_layers,
        )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> DecoderSpec:
        return cls.from_arch(ModelArch.from_hf_config(config, name=source), source)
