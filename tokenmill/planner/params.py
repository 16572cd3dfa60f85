"""Parameter count from the architecture, tensor by tensor.

The model is described as a list of TensorGroups (one entry per kind of tensor, with how many copies the model
holds). The same list feeds the parameter count, the weight bytes under each precision and the tensor-parallel
split, so the three can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.planner.arch import ModelArch

# TensorGroup.kind values
EMBEDDING = "embedding"  # token embedding table [vocab, hidden]
LM_HEAD = "lm_head"  # output projection [vocab, hidden] (absent when tied)
LINEAR = "linear"  # a weight matrix of attention or a dense/shared MLP
EXPERT = "expert"  # a weight matrix of one routed expert
ROUTER = "router"  # MoE router; kept at 16 bit by every quantization scheme
VECTOR = "vector"  # norms and biases
VISION = "vision"  # vision encoder + projector of a multimodal model


@dataclass(frozen=True)
class TensorGroup:
    """``count`` tensors of shape [rows, cols] (out_features x in_features; vectors have rows=1)."""

    name: str
    component: (
        str  # "embedding" | "lm_head" | "attention" | "mlp" | "experts" | "router" | "norms" | "vision"
    )
    kind: str
    rows: int
    cols: int
    count: int
    tp_sharded: bool = True  # split across tensor-parallel ranks (False: every rank holds a copy)
    # Which decoder layers hold the copies, for the pipeline-parallel split: "all" (one set per layer), "dense"
    # (per dense-MLP layer), "moe" (per MoE layer); "" for a tensor held once per model (embedding, final
    # norm, lm_head, vision tower).
    per_layer: str = ""

    @property
    def numel(self) -> int:
        return self.rows * self.cols * self.count


@dataclass(frozen=True)
class ParamCount:
    """total: every stored parameter. active: those one token uses (routed experts: top-k of them; the
    vision encoder is not counted as active for text tokens)."""

    total: int
    active: int
    by_component: dict[str, int] = field(default_factory=dict)  # component -> parameters


def _attention_groups(arch: ModelArch, n: int) -> list[TensorGroup]:
    """Tensors of ``n`` attention blocks."""
    h, heads, kv = arch.hidden_size, arch.num_attention_heads, arch.num_kv_heads
    groups: list[TensorGroup] = []

    def lin(name: str, rows: int, cols: int, sharded: bool = True) -> None:
        groups.append(TensorGroup(f"attn.{name}", "attention", LINEAR, rows, cols, n, sharded, "all"))

    def vec(name: str, size: int, sharded: bool = False) -> None:
        groups.append(TensorGroup(f"attn.{name}", "attention", VECTOR, 1, size, n, sharded, "all"))

    if arch.is_mla:
        qk_dim = arch.qk_nope_head_dim + arch.qk_rope_head_dim
        assert arch.kv_lora_rank is not None
        if arch.q_lora_rank:
            lin("q_a_proj", arch.q_lora_rank, h, sharded=False)
            vec("q_a_layernorm", arch.q_lora_rank)
            lin("q_b_proj", heads * qk_dim, arch.q_lora_rank)
        else:
            lin("q_proj", heads * qk_dim, h)
        # The compressed latent and the shared rope key are computed once and replicated on every rank.
        lin("kv_a_proj_with_mqa", arch.kv_lora_rank + arch.qk_rope_head_dim, h, sharded=False)
        vec("kv_a_layernorm", arch.kv_lora_rank)
        lin("kv_b_proj", heads * (arch.qk_nope_head_dim + arch.v_head_dim), arch.kv_lora_rank)
        lin("o_proj", h, heads * arch.v_head_dim)
        return groups

    d = arch.head_dim
    lin("q_proj", heads * d, h)
    lin("k_proj", kv * d, h)
    lin("v_proj", kv * d, h)
    lin("o_proj", h, heads * d)
    if arch.qkv_bias:
        vec("q_bias", heads * d, sharded=True)
        vec("k_bias", kv * d, sharded=True)
        vec("v_bias", kv * d, sharded=True)
    if arch.o_bias:
        vec("o_bias", h)
    if arch.qk_norm:
        vec("q_norm", d)
        vec("k_norm", d)
    return groups


def _mlp_groups(prefix: str, component: str, kind: str, hidden: int, inter: int, count: int, arch: ModelArch,
                per_layer: str):
    groups = []
    if arch.gated_mlp:
        groups.append(TensorGroup(f"{prefix}.gate_proj", component, kind, inter, hidden, count, True, per_layer))
    groups.append(TensorGroup(f"{prefix}.up_proj", component, kind, inter, hidden, count, True, per_layer))
    groups.append(TensorGroup(f"{prefix}.down_proj", component, kind, hidden, inter, count, True, per_layer))
    if arch.mlp_bias and kind == LINEAR:
        groups.append(
            TensorGroup(f"{prefix}.bias", component, VECTOR, 1, (2 if arch.gated_mlp else 1) * inter, count, True,
                        per_layer)
        )
        groups.append(TensorGroup(f"{prefix}.down_bias", component, VECTOR, 1, hidden, count, False, per_layer))
    return groups


def tensor_groups(arch: ModelArch) -> list[TensorGroup]:
    """Every weight tensor of the model, grouped by kind."""
    h = arch.hidden_size
    num_moe = len(arch.moe_layers) if arch.num_experts else 0
    num_dense = arch.num_layers - num_moe
    groups = [TensorGroup("embed_tokens", "embedding", EMBEDDING, arch.vocab_size, h, 1)]
    groups += _attention_groups(arch, arch.num_layers)
    if num_dense:
        groups += _mlp_groups("mlp", "mlp", LINEAR, h, arch.intermediate_size, num_dense, arch, "dense")
    if num_moe:
        e = arch.num_experts
        groups += _mlp_groups("experts", "experts", EXPERT, h, arch.moe_intermediate_size, num_moe * e, arch,
                              "moe")
        groups.append(TensorGroup("router", "router", ROUTER, e, h, num_moe, tp_sharded=False, per_layer="moe"))
        if arch.router_bias:
            groups.append(
                TensorGroup("router.bias", "router", VECTOR, 1, e, num_moe, tp_sharded=False, per_layer="moe")
            )
        if arch.shared_expert_intermediate_size:
            groups += _mlp_groups(
                "shared_expert", "mlp", LINEAR, h, arch.shared_expert_intermediate_size, num_moe, arch, "moe"
            )
        if arch.shared_expert_gate:
            groups.append(
                TensorGroup("shared_expert_gate", "router", ROUTER, 1, h, num_moe, tp_sharded=False,
                            per_layer="moe")
            )
    groups.append(
        TensorGroup(
            "layer_norms", "norms", VECTOR, 1, h, arch.num_layers * arch.norms_per_layer, tp_sharded=False,
            per_layer="all",
        )
    )
    groups.append(TensorGroup("final_norm", "norms", VECTOR, 1, h, 1, tp_sharded=False))
    if not arch.tie_word_embeddings:
        groups.append(TensorGroup("lm_head", "lm_head", LM_HEAD, arch.vocab_size, h, 1))
    if arch.vision_params:
        groups.append(
            TensorGroup("vision_tower", "vision", VISION, 1, arch.vision_params, 1, tp_sharded=False)
        )
    return groups


def param_count(arch: ModelArch) -> ParamCount:
    """Total and per-token active parameters, with a breakdown by component."""
    by_component: dict[str, int] = {}
    total = 0
    inactive = 0
    for g in tensor_groups(arch):
        by_component[g.component] = by_component.get(g.component, 0) + g.numel
        total += g.numel
        if g.kind == EXPERT:
            # Each token runs top-k of the num_experts experts of every MoE layer.
            inactive += g.numel - g.numel // arch.num_experts * arch.num_experts_per_tok
        elif g.kind == VISION:
            inactive += g.numel
    return ParamCount(total=total, active=total - inactive, by_component=by_component)
