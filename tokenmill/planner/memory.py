"""GPU memory model: weights, KV cache, activation peak and fixed runtime overhead.

The engine sizes its KV cache with these functions, so the planner's numbers are the engine's numbers:
``num_blocks = kv_cache_memory // kv_cache_bytes_per_block(arch, block_size, kv_dtype, tp)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from tokenmill.planner.arch import ModelArch
from tokenmill.planner.dtypes import (
    Precision,
    dtype_bytes,
    gguf_type_for_row,
    normalize_dtype,
    parse_precision,
)
from tokenmill.planner.params import (
    EMBEDDING,
    EXPERT,
    LINEAR,
    LM_HEAD,
    ROUTER,
    VECTOR,
    TensorGroup,
    tensor_groups,
)

GiB = 1024**3
MiB = 1024**2

# ----------------------------------------------------------------------------------------------------------
# Tensor parallelism
# ----------------------------------------------------------------------------------------------------------


def check_tensor_parallel_size(arch: ModelArch, tensor_parallel_size: int) -> None:
    """Raise ValueError unless ``tensor_parallel_size`` splits the model's heads evenly.

    Query heads must divide evenly. KV heads must divide evenly too, or, when there are fewer KV heads than
    ranks, the rank count must be a multiple of them (each KV head is then replicated on tp/num_kv_heads ranks).
    """
    tp = tensor_parallel_size
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
    heads, kv = arch.num_attention_heads, arch.num_kv_heads
    ok = heads % tp == 0 and (kv % tp == 0 or tp % kv == 0 or arch.is_mla)
    if not ok:
        valid = ", ".join(str(t) for t in valid_tensor_parallel_sizes(arch, max_size=max(8, tp)))
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide {arch.name}'s heads (num_attention_heads={heads}, "
            f"num_key_value_heads={kv}): use one of {valid}"
        )


def valid_tensor_parallel_sizes(arch: ModelArch, max_size: int = 8) -> list[int]:
    """Tensor-parallel sizes up to ``max_size`` that split the heads evenly."""
    heads, kv = arch.num_attention_heads, arch.num_kv_heads
    return [
        tp
        for tp in range(1, max_size + 1)
        if heads % tp == 0 and (kv % tp == 0 or tp % kv == 0 or arch.is_mla)
    ]


def num_kv_heads_per_rank(arch: ModelArch, tensor_parallel_size: int = 1) -> int:
    """KV heads one rank stores: num_kv_heads / tp, or 1 when the heads are replicated (tp > num_kv_heads)."""
    check_tensor_parallel_size(arch, tensor_parallel_size)
    return max(1, arch.num_kv_heads // tensor_parallel_size)


def pipeline_stage_layers(num_layers: int, pipeline_parallel_size: int) -> list[tuple[int, int]]:
    """The [start, end) decoder layers of each pipeline stage: an even split, the first stages taking one layer
    more when num_layers does not divide (the last stage also holds the final norm and the lm_head, the first
    the embedding). The engine splits its layers with this function, so the plan and the running engine agree.

    >>> pipeline_stage_layers(30, 4)
    [(0, 8), (8, 16), (16, 23), (23, 30)]
    """
    pp = pipeline_parallel_size
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pipeline_parallel_size must be a positive integer, got {pp!r}")
    if pp > num_layers:
        raise ValueError(f"pipeline_parallel_size={pp} exceeds the model's {num_layers} layers: every stage needs "
                         f"at least one layer, use at most {num_layers}")
    base, extra = divmod(num_layers, pp)
    stages, start = [], 0
    for stage in range(pp):
        end = start + base + (1 if stage < extra else 0)
        stages.append((start, end))
        start = end
    return stages


def stage_layer_range(arch: ModelArch, pipeline_parallel_size: int = 1, pipeline_stage: int = 0) -> tuple[int, int]:
    """The [start, end) decoder layers pipeline stage ``pipeline_stage`` of ``pipeline_parallel_size`` runs."""
    stages = pipeline_stage_layers(arch.num_layers, pipeline_parallel_size)
    if not isinstance(pipeline_stage, int) or not 0 <= pipeline_stage < len(stages):
        raise ValueError(
            f"pipeline_stage must be in 0..{len(stages) - 1} for pipeline_parallel_size={pipeline_parallel_size}, "
            f"got {pipeline_stage!r}"
        )
    return stages[pipeline_stage]


def _layer_counts(arch: ModelArch, start: int, end: int) -> dict[str, int]:
    """Decoder layers in [start, end): all of them, the dense-MLP ones and the MoE ones (TensorGroup.per_layer)."""
    moe = sum(1 for i in arch.moe_layers if start <= i < end) if arch.num_experts else 0
    return {"all": end - start, "dense": end - start - moe, "moe": moe}


# ----------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the weights on one rank, with the precision that produced them."""

    total: int
    precision: str
    by_component: dict[str, int] = field(default_factory=dict)  # component -> bytes on one rank
    exact: bool = False  # True when taken from the stored file rather than computed


def resolve_precision(
    arch: ModelArch, precision: str | Precision = "auto", group_size: int | None = None
) -> Precision:
    """The precision to plan with. "auto" means what the checkpoint stores; like vLLM's dtype="auto", a float32
    checkpoint is served in bfloat16."""
    if isinstance(precision, Precision):
        return precision
    if str(precision).lower() == "auto":
        if arch.quantization:
            return parse_precision(arch.quantization, group_size or arch.quant_group_size or 128)
        return parse_precision("fp16" if arch.dtype == "float16" else "bf16")
    return parse_precision(precision, group_size or 128)


# Projections that read the same input as the one before them (fused with it in the engine).
_SHARED_INPUT_PARTS = ("k_proj", "v_proj", "up_proj")


def _group_bytes(g: TensorGroup, p: Precision) -> float:
    """Bytes of one TensorGroup stored at precision ``p`` (all ``count`` copies)."""
    if p.kind == "dense":
        return g.numel * p.weight_bytes
    if p.kind == "gguf":
        return _gguf_group_bytes(g, p)
    quantized = g.kind in (LINEAR, EXPERT)
    if not quantized:  # embeddings, lm_head, router, norms, biases, vision tower stay at 16 bit
        return g.numel * 2
    rows, cols = g.rows, g.cols
    if p.kind in ("fp8", "int8"):
        per_matrix = rows * cols + rows * 4  # 1-byte weights + one fp32 scale per output channel
    else:  # awq / gptq, 4-bit
        groups = math.ceil(cols / p.group_size)
        packed_rows = math.ceil(rows / 8) * 4  # eight 4-bit values per int32
        per_matrix = (
            cols * packed_rows + groups * rows * 2 + groups * packed_rows
        )  # weights, fp16 scales, zeros
        if p.kind == "gptq" and not g.name.endswith(_SHARED_INPUT_PARTS):
            # g_idx: int32 group index per input channel, one per input: q/k/v (and gate/up) share theirs.
            per_matrix += cols * 4
    return per_matrix * g.count


def _gguf_group_bytes(g: TensorGroup, p: Precision) -> float:
    """llama.cpp's choices: norms/biases/router in F32; the output layer (or the tied embedding that serves as
    it) at Q6_K unless the file is Q8_0 or unquantized; "_M" mixes give attn_v and ffn_down of half the
    layers Q6_K."""
    assert p.gguf_type is not None
    base = p.gguf_type
    if g.kind in (VECTOR, ROUTER):
        return g.numel * 4
    type_name = base
    if g.kind == LM_HEAD and base not in ("Q8_0", "F16", "BF16", "F32"):
        type_name = "Q6_K"
    if g.kind not in (LINEAR, EXPERT, EMBEDDING, LM_HEAD):
        type_name = "F16"
    gtype = gguf_type_for_row(type_name, g.cols)
    if p.gguf_mix and g.name.endswith(("v_proj", "down_proj")):
        upgraded = gguf_type_for_row("Q6_K", g.cols)
        half = g.count // 2
        return gtype.nbytes(g.rows * g.cols) * (g.count - half) + upgraded.nbytes(g.rows * g.cols) * half
    return gtype.nbytes(g.rows * g.cols) * g.count


def weight_bytes(
    arch: ModelArch,
    precision: str | Precision = "auto",
    tensor_parallel_size: int = 1,
    group_size: int | None = None,
    pipeline_parallel_size: int = 1,
    pipeline_stage: int = 0,
) -> WeightBytes:
    """Bytes of the weights held by one of ``tensor_parallel_size`` ranks of pipeline stage ``pipeline_stage``.

    Sharded tensors (attention/MLP projections, experts, vocab-parallel embeddings) are split evenly; norms,
    routers, MLA's latent down-projections and the vision tower are replicated on every rank. With
    precision="auto" on a GGUF file the total is the file's exact tensor bytes.

    Pipeline stages (pipeline_stage_layers) hold their own decoder layers; the first stage also holds the
    embedding (and a vision tower), the last the final norm and the lm_head: with tied embeddings and more than
    one stage, the last stage keeps its own copy of the embedding table as the output layer.
    """
    check_tensor_parallel_size(arch, tensor_parallel_size)
    pp, stage = pipeline_parallel_size, pipeline_stage
    start, end = stage_layer_range(arch, pp, stage)
    first, last = stage == 0, stage == pp - 1
    p = resolve_precision(arch, precision, group_size)
    groups = tensor_groups(arch)
    if p.kind == "gguf" and arch.tie_word_embeddings:
        # The tied embedding is the output layer too: llama.cpp quantizes it like the output layer.
        groups = [replace(g, kind=LM_HEAD) if g.kind == EMBEDDING else g for g in groups]
    totals = _layer_counts(arch, 0, arch.num_layers)
    in_stage = _layer_counts(arch, start, end)
    by_component: dict[str, float] = {}
    full_total = 0.0
    for g in groups:
        nbytes = _group_bytes(g, p)
        full_total += nbytes
        if g.per_layer:
            share = in_stage[g.per_layer] / totals[g.per_layer] if totals[g.per_layer] else 0.0
        elif g.component in ("embedding", "vision"):
            share = 1.0 if first else 0.0
        else:  # final norm, lm_head
            share = 1.0 if last else 0.0
        per_rank = nbytes * share / (tensor_parallel_size if g.tp_sharded else 1)
        if per_rank:
            by_component[g.component] = by_component.get(g.component, 0.0) + per_rank
        if g.component == "embedding" and arch.tie_word_embeddings and last and not first:
            # The last stage's own copy of the tied table, serving as its output layer.
            by_component["lm_head"] = by_component.get("lm_head", 0.0) + nbytes / tensor_parallel_size
    exact = False
    if str(precision).lower() == "auto" and arch.file_weight_bytes:
        scale = arch.file_weight_bytes / full_total  # exact stored bytes, split like the estimate
        by_component = {k: v * scale for k, v in by_component.items()}
        exact = tensor_parallel_size == 1 and pp == 1
    rounded = {k: int(math.ceil(v)) for k, v in by_component.items()}
    total = arch.file_weight_bytes if exact else sum(rounded.values())
    return WeightBytes(total=int(total), precision=p.name, by_component=rounded, exact=exact)


# ----------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------


def kv_cache_bytes_per_token_per_layer(
    arch: ModelArch, kv_dtype: object = "bfloat16", tensor_parallel_size: int = 1
) -> int:
    """Bytes one token adds to one layer's KV cache on one rank.

    Standard/grouped-query attention stores K and V for each KV head: 2 * kv_heads_per_rank * head_dim.
    MLA stores one compressed latent plus the shared rope key, kv_lora_rank + qk_rope_head_dim, and every rank
    keeps the whole latent (it is not split by head).
    """
    nbytes = dtype_bytes(kv_dtype)
    check_tensor_parallel_size(arch, tensor_parallel_size)
    if arch.is_mla:
        assert arch.kv_lora_rank is not None
        return (arch.kv_lora_rank + arch.qk_rope_head_dim) * nbytes
    return 2 * num_kv_heads_per_rank(arch, tensor_parallel_size) * arch.head_dim * nbytes


def kv_cache_bytes_per_token(
    arch: ModelArch,
    kv_dtype: object = "bfloat16",
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    pipeline_stage: int = 0,
) -> int:
    """KV bytes per token on one rank, counting every layer (of the pipeline stage) as full attention."""
    start, end = stage_layer_range(arch, pipeline_parallel_size, pipeline_stage)
    return (end - start) * kv_cache_bytes_per_token_per_layer(arch, kv_dtype, tensor_parallel_size)


def kv_cache_bytes_per_block(
    arch: ModelArch,
    block_size: int,
    kv_dtype: object = "bfloat16",
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    pipeline_stage: int = 0,
) -> int:
    """Bytes a paged engine allocates per KV block on one rank, over all layers (of its pipeline stage).

    Each layer holds a tensor [2, num_blocks, block_size, num_kv_heads, head_dim] (MLA:
    [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]), so one block costs
    num_layers * 2 * block_size * num_kv_heads * head_dim * dtype_bytes. Every layer's block is allocated,
    sliding-window layers included.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(
            f"block_size must be a positive integer, got {block_size!r}: use 16 (vLLM's default)"
        )
    return block_size * kv_cache_bytes_per_token(
        arch, kv_dtype, tensor_parallel_size, pipeline_parallel_size, pipeline_stage
    )


def tokens_cached_per_layer(
    arch: ModelArch, context_len: int, block_size: int | None = None
) -> tuple[int, int]:
    """(tokens a full-attention layer keeps, tokens a sliding-window layer keeps) for one sequence.

    With a block size, both round up to whole blocks, and a sliding layer keeps one block more than the window
    needs because the window rarely starts on a block boundary.
    """
    if context_len < 0:
        raise ValueError(f"context_len must be >= 0, got {context_len}")
    window = arch.sliding_window or context_len
    if block_size is None:
        return context_len, min(context_len, window)
    full_blocks = -(-context_len // block_size)
    sliding_blocks = full_blocks if context_len <= window else min(full_blocks, -(-window // block_size) + 1)
    return full_blocks * block_size, sliding_blocks * block_size


def kv_cache_bytes_per_sequence(
    arch: ModelArch,
    context_len: int,
    kv_dtype: object = "bfloat16",
    tensor_parallel_size: int = 1,
    block_size: int | None = None,
    pipeline_parallel_size: int = 1,
    pipeline_stage: int = 0,
) -> int:
    """KV bytes one sequence of ``context_len`` tokens holds on one rank (of one pipeline stage), with
    sliding-window layers capped at their window (as a sliding-window-aware paged cache frees blocks that fall
    out of the window)."""
    per_layer = kv_cache_bytes_per_token_per_layer(arch, kv_dtype, tensor_parallel_size)
    full_tokens, sliding_tokens = tokens_cached_per_layer(arch, context_len, block_size)
    start, end = stage_layer_range(arch, pipeline_parallel_size, pipeline_stage)
    num_sliding = sum(1 for i in arch.sliding_window_layers if start <= i < end)
    return per_layer * ((end - start - num_sliding) * full_tokens + num_sliding * sliding_tokens)


# ----------------------------------------------------------------------------------------------------------
# Activations and fixed overhead
# ----------------------------------------------------------------------------------------------------------

# vLLM's default max_num_seqs: the sampler materializes logits for up to this many sequences per step.
DEFAULT_MAX_NUM_SEQS = 256


def activation_peak_bytes(
    arch: ModelArch,
    max_num_batched_tokens: int,
    dtype: object = "bfloat16",
    tensor_parallel_size: int = 1,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    include_logits: bool = True,
) -> int:
    """Peak memory of the temporary tensors of one forward pass over ``max_num_batched_tokens`` tokens, on one
    rank. This is what an engine reserves by profiling a worst-case batch before it sizes the KV cache.

    Per layer, with T tokens, the residual stream and the normed input stay alive ([T, hidden] each) while the
    larger of two blocks runs:
      attention  q, k, v and the attention output        T * (q + 2 * kv + q_out) / tp
      MLP        gate_up and the activated product        T * 3 * intermediate / tp
      MoE        each token's top-k expert inputs/outputs T * top_k * (3 * moe_intermediate / tp + hidden)
                 plus router logits in fp32               T * num_experts * 4 bytes
    Then the logits of the sequences that sample this step, min(T, max_num_seqs) rows over the full vocab:
    the model-dtype logits, an fp32 copy and the fp32 probabilities (include_logits=False: a pipeline stage
    other than the last, which never computes logits).
    """
    if not isinstance(max_num_batched_tokens, int) or max_num_batched_tokens < 1:
        raise ValueError(
            f"max_num_batched_tokens must be a positive integer, got {max_num_batched_tokens!r}: use 8192 or 2048"
        )
    check_tensor_parallel_size(arch, tensor_parallel_size)
    b = dtype_bytes(dtype)
    t, tp = max_num_batched_tokens, tensor_parallel_size
    heads = arch.num_attention_heads
    if arch.is_mla:
        assert arch.kv_lora_rank is not None
        q = heads * (arch.qk_nope_head_dim + arch.qk_rope_head_dim)
        # prefill expands the latent into per-head k_nope and v; k_rope is shared
        kv = heads * (arch.qk_nope_head_dim + arch.v_head_dim) + arch.kv_lora_rank + arch.qk_rope_head_dim
        out = heads * arch.v_head_dim
        attn = t * (2 * q + kv + out) / tp  # q is concatenated with its rope part: one extra copy
    else:
        q = heads * arch.head_dim
        kv = 2 * num_kv_heads_per_rank(arch, tp) * arch.head_dim
        attn = t * (q / tp + kv + q / tp)
    dense_mlp = t * 3 * arch.intermediate_size / tp if len(arch.moe_layers) < arch.num_layers else 0.0
    moe = 0.0
    if arch.is_moe:
        k = arch.num_experts_per_tok
        moe = t * k * (3 * arch.moe_intermediate_size / tp + arch.hidden_size)
        moe += t * 3 * arch.shared_expert_intermediate_size / tp
        moe += t * arch.num_experts * 4 / b  # fp32 router logits, in units of the activation dtype
    residual = 2 * t * arch.hidden_size
    layer_peak = (residual + max(attn, dense_mlp, moe)) * b
    logit_rows = min(t, max_num_seqs) if include_logits else 0
    logits = logit_rows * arch.vocab_size * (b + 4 + 4)
    return int(layer_peak + logits)


@dataclass(frozen=True)
class Overhead:
    """Memory an inference process holds outside weights, KV cache and activations, on one device."""

    runtime: int  # CUDA context and loaded kernels (GPU), or the Metal/CPU runtime
    workspace: int  # cuBLAS/attention workspaces, allocator slack
    communication: int  # NCCL buffers when tensor-parallel
    cuda_graphs: int  # captured decode graphs

    @property
    def total(self) -> int:
        return self.runtime + self.workspace + self.communication + self.cuda_graphs


def overhead_bytes(
    device_kind: str = "gpu",
    tensor_parallel_size: int = 1,
    enforce_eager: bool = False,
    pipeline_parallel_size: int = 1,
) -> Overhead:
    """Fixed runtime overhead per device.

    GPU: 0.5 GiB CUDA context, 0.25 GiB workspaces, 0.5 GiB NCCL buffers when tp > 1 or pp > 1, 0.5 GiB for
    CUDA graphs unless enforce_eager. Apple Silicon / CPU: 0.5 GiB for the runtime, nothing else.
    """
    if device_kind not in ("gpu", "apple", "cpu"):
        raise ValueError(f"device_kind must be 'gpu', 'apple' or 'cpu', got {device_kind!r}")
    if device_kind != "gpu":
        return Overhead(runtime=512 * MiB, workspace=0, communication=0, cuda_graphs=0)
    return Overhead(
        runtime=512 * MiB,
        workspace=256 * MiB,
        communication=512 * MiB if tensor_parallel_size > 1 or pipeline_parallel_size > 1 else 0,
        cuda_graphs=0 if enforce_eager else 512 * MiB,
    )


def kv_dtype_for(precision: Precision, kv_dtype: object = "auto") -> str:
    """Resolve kv_dtype="auto" to the activation dtype of the weights, as vLLM does."""
    if isinstance(kv_dtype, str) and kv_dtype.lower() == "auto":
        return precision.compute_dtype
    return normalize_dtype(kv_dtype)


__all__ = [
    "GiB",
    "MiB",
    "Overhead",
    "WeightBytes",
    "activation_peak_bytes",
    "check_tensor_parallel_size",
    "kv_cache_bytes_per_block",
    "kv_cache_bytes_per_sequence",
    "kv_cache_bytes_per_token",
    "kv_cache_bytes_per_token_per_layer",
    "kv_dtype_for",
    "num_kv_heads_per_rank",
    "overhead_bytes",
    "pipeline_stage_layers",
    "resolve_precision",
    "stage_layer_range",
    "tokens_cached_per_layer",
    "valid_tensor_parallel_sizes",
    "weight_bytes",
]


# ----------------------------------------------------------------------------------------------------------
# The engine's own layouts
# ----------------------------------------------------------------------------------------------------------


def engine_weight_bytes(
    arch: ModelArch,
    dtype: object,
    quant_config: Any | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    pipeline_stage: int = 0,
    device_type: str = "cpu",
) -> int:
    """Bytes of the weights tokenmill's engine allocates for a Llama-family model run in `dtype`, with the
    linear layers (and embedding table) stored by `quant_config`'s methods (a
    tokenmill.model.quantization.QuantizationConfig; None: full precision): each method's weight_bytes for
    each layer, plus biases and norms in `dtype`. Tests check it against the real allocations for every
    registered format.

    A tied embedding serves as the output layer: counted once, except where the full-precision bfloat16 CPU
    path keeps a oneDNN-packed copy for the output matmul (counted then, as it is allocated; device_type is the
    torch device type the engine runs on, "cpu" or "cuda").

    For one rank of a tensor-parallel group: q/k/v and gate/up split by output rows (KV heads replicated when
    tp exceeds them: num_kv_heads_per_rank), o/down by input columns, the embedding and lm_head by vocab rows
    (ceil(vocab / tp) each); norms and the o_proj bias replicated. For one pipeline stage: its decoder layers
    (pipeline_stage_layers), the embedding on the first stage, the final norm and the lm_head on the last (a
    tied table copied there when the stages differ).
    """
    import torch

    from tokenmill.model.quantization.unquantized import (
        UnquantizedConfig,
        UnquantizedLinearMethod,
        _onednn_packing_available,
    )

    tp = tensor_parallel_size
    check_tensor_parallel_size(arch, tp)
    start, end = stage_layer_range(arch, pipeline_parallel_size, pipeline_stage)
    first, last = pipeline_stage == 0, pipeline_stage == pipeline_parallel_size - 1
    torch_dtype = getattr(torch, normalize_dtype(dtype))
    q = quant_config or UnquantizedConfig()
    h, d = arch.hidden_size, arch.head_dim
    inter = arch.intermediate_size // tp
    q_size, kv_size = arch.num_attention_heads * d // tp, num_kv_heads_per_rank(arch, tp) * d
    vocab = -(-arch.vocab_size // tp)
    item = torch_dtype.itemsize

    def linear(name: str, in_features: int, shards: dict[str, int]) -> int:
        """Bytes of the engine's layer `name` fusing the checkpoint's `shards` (name -> rows)."""
        method = q.get_linear_method(name, list(shards))
        return method.weight_bytes(in_features, list(shards.values()), torch_dtype)

    embed_method = q.get_linear_method("model.embed_tokens", ["model.embed_tokens"])
    embed_bytes = embed_method.weight_bytes(h, [vocab], torch_dtype)
    total = embed_bytes if first else 0
    if last:
        if arch.tie_word_embeddings:
            if not first:
                total += embed_bytes  # the last stage's own copy of the table
            packed = device_type == "cpu" and torch_dtype == torch.bfloat16 and _onednn_packing_available()
            if isinstance(embed_method, UnquantizedLinearMethod) and packed:
                total += vocab * h * item  # the packed copy the output matmul runs on
        else:
            total += linear("lm_head", h, {"lm_head": vocab})
        total += h * item  # the final norm
    for i in range(start, end):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        total += linear(f"{a}.qkv_proj", h, {f"{a}.q_proj": q_size, f"{a}.k_proj": kv_size, f"{a}.v_proj": kv_size})
        total += linear(f"{a}.o_proj", q_size, {f"{a}.o_proj": h})
        total += linear(f"{m}.gate_up_proj", h, {f"{m}.gate_proj": inter, f"{m}.up_proj": inter})
        total += linear(f"{m}.down_proj", inter, {f"{m}.down_proj": h})
        vectors = 2 * h + (q_size + 2 * kv_size if arch.qkv_bias else 0) + (h if arch.o_bias else 0)
        vectors += 2 * d if arch.qk_norm else 0
        total += vectors * item
    return total
