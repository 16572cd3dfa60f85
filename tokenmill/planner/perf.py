"""Speed from rooflines: decode tokens/s, prefill time, and steady-state serving throughput.

A decode step for a batch of B sequences must read every weight it uses once and each sequence's KV cache,
and do 2 FLOPs per active parameter per token plus the attention over the context:

    bytes_step = weights_read(B) + B * kv_bytes_per_sequence(context)
    flops_step = B * (2 * matmul_params_active + attention_flops(context))
    roofline   = B / max(bytes_step / bandwidth, flops_step / peak_flops)          tokens/s
    estimate   = B / max(bytes_step / (bandwidth * eff_bw), flops_step / (peak_flops * eff_c))

With eff_bw, eff_c <= 1 the estimate can never exceed the roofline. For MoE, a batch of B tokens touches
on average E * (1 - (1 - k/E)^B) of the E experts of a layer (uniform routing), so small batches read only
a fraction of the expert weights.

With M pipeline stages the batch runs as M microbatches of ceil(B / M) sequences, one per stage at a time: a
stage's tick reads its own weights and its layers' KV of one microbatch, the slowest stage sets the tick, and
every sequence gets a token each M ticks. Weights are then read M times per round, so pipeline parallelism
buys memory (and KV room) more than decode speed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tokenmill.planner.arch import ModelArch
from tokenmill.planner.gpus import GPUSpec
from tokenmill.planner.memory import (
    check_tensor_parallel_size,
    kv_cache_bytes_per_sequence,
    kv_dtype_for,
    pipeline_stage_layers,
    resolve_precision,
    weight_bytes,
)
from tokenmill.planner.params import param_count


def _attention_dims(arch: ModelArch, absorbed: bool) -> tuple[int, int]:
    """(q.k dot-product size, v size) per head. MLA decode runs in the absorbed form, attending over the
    latent (kv_lora_rank + rope for scores, kv_lora_rank for values)."""
    if arch.is_mla:
        assert arch.kv_lora_rank is not None
        if absorbed:
            return arch.kv_lora_rank + arch.qk_rope_head_dim, arch.kv_lora_rank
        return arch.qk_nope_head_dim + arch.qk_rope_head_dim, arch.v_head_dim
    return arch.head_dim, arch.head_dim


def attention_flops_decode(arch: ModelArch, context_len: int) -> float:
    """FLOPs of attention for one new token that attends to ``context_len`` cached tokens, all layers."""
    d_qk, d_v = _attention_dims(arch, absorbed=True)
    per_key = 2 * arch.num_attention_heads * (d_qk + d_v)
    window = arch.sliding_window or context_len
    keys = arch.num_full_attention_layers * context_len + arch.num_sliding_layers * min(context_len, window)
    return float(per_key * keys)


def attention_flops_prefill(arch: ModelArch, num_tokens: int) -> float:
    """FLOPs of causal attention over a prompt of ``num_tokens`` tokens, all layers."""
    d_qk, d_v = _attention_dims(arch, absorbed=False)
    per_pair = 2 * arch.num_attention_heads * (d_qk + d_v)
    n = num_tokens
    full_pairs = n * (n + 1) / 2
    w = arch.sliding_window or n
    sliding_pairs = full_pairs if n <= w else w * (w + 1) / 2 + (n - w) * w
    return per_pair * (arch.num_full_attention_layers * full_pairs + arch.num_sliding_layers * sliding_pairs)


def matmul_params_per_token(arch: ModelArch) -> int:
    """Parameters one token multiplies through: active ones, minus the embedding lookup (a gather, no
    FLOPs) unless the embedding doubles as the output layer."""
    pc = param_count(arch)
    embed = 0 if arch.tie_word_embeddings else pc.by_component.get("embedding", 0)
    return pc.active - embed


@dataclass(frozen=True)
class DecodeEstimate:
    """One decode step of ``batch_size`` sequences at ``context_len`` tokens of context.

    tokens_per_s counts all ``tensor_parallel_size`` x ``pipeline_parallel_size`` devices together;
    tokens_per_s_per_gpu divides by them. Bytes and FLOPs are per device; with pipeline stages, those of the
    slowest stage's tick (one microbatch), and step_time_s is the time between two tokens of a sequence.
    """

    gpu: str
    batch_size: int
    context_len: int
    tensor_parallel_size: int
    weight_bytes_read: float
    kv_bytes_read: float
    flops: float
    bandwidth_efficiency: float
    compute_efficiency: float
    step_time_s: float
    tokens_per_s: float
    bandwidth_roofline_tokens_per_s: float
    compute_roofline_tokens_per_s: float
    pipeline_parallel_size: int = 1

    @property
    def num_gpus(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def roofline_tokens_per_s(self) -> float:
        return min(self.bandwidth_roofline_tokens_per_s, self.compute_roofline_tokens_per_s)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.num_gpus

    @property
    def tokens_per_s_per_sequence(self) -> float:
        return 1.0 / self.step_time_s

    @property
    def bound(self) -> str:
        """Which roofline sets the step time: "memory" (bandwidth) or "compute"."""
        memory_t = self.batch_size / self.bandwidth_roofline_tokens_per_s / self.bandwidth_efficiency
        compute_t = self.batch_size / self.compute_roofline_tokens_per_s / self.compute_efficiency
        return "memory" if memory_t >= compute_t else "compute"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            roofline_tokens_per_s=self.roofline_tokens_per_s,
            tokens_per_s_per_gpu=self.tokens_per_s_per_gpu,
            tokens_per_s_per_sequence=self.tokens_per_s_per_sequence,
            bound=self.bound,
        )
        return d


def decode_weight_bytes_read(
    arch: ModelArch,
    batch_size: int,
    precision: object = "auto",
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    pipeline_stage: int = 0,
) -> float:
    """Weight bytes one device (of one pipeline stage) reads in one decode step of ``batch_size`` tokens."""
    wb = weight_bytes(
        arch, precision, tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,  # type: ignore[arg-type]
        pipeline_stage=pipeline_stage,
    )
    parts = dict(wb.by_component)
    parts.pop("vision", None)  # not run for text tokens
    if not (arch.tie_word_embeddings and pipeline_stage == pipeline_parallel_size - 1):
        parts.pop("embedding", None)  # B rows gathered, not the table (unless it is this stage's output layer)
    if arch.is_moe and "experts" in parts:
        k, e = arch.num_experts_per_tok, arch.num_experts
        touched = 1.0 - (1.0 - k / e) ** batch_size  # expected fraction of a layer's experts some token picks
        parts["experts"] = parts["experts"] * touched
    return float(sum(parts.values()))


def decode_estimate(
    arch: ModelArch,
    gpu: GPUSpec,
    batch_size: int,
    context_len: int,
    precision: object = "auto",
    kv_dtype: object = "auto",
    tensor_parallel_size: int = 1,
    group_size: int | None = None,
    pipeline_parallel_size: int = 1,
) -> DecodeEstimate:
    """Decode throughput of ``batch_size`` concurrent sequences, each attending to ``context_len`` tokens."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if context_len < 0:
        raise ValueError(f"context_len must be >= 0, got {context_len}")
    check_tensor_parallel_size(arch, tensor_parallel_size)
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    stages = pipeline_stage_layers(arch.num_layers, pp)
    p = resolve_precision(arch, precision, group_size)  # type: ignore[arg-type]
    kv_dt = kv_dtype_for(p, kv_dtype)
    # "auto" keeps a GGUF file's exact bytes; an explicit precision is planned as given.
    w_prec = "auto" if isinstance(precision, str) and precision.lower() == "auto" else p
    micro = -(-batch_size // pp)  # sequences per microbatch
    pc = param_count(arch)
    lm_head = pc.by_component.get("lm_head", 0) or (
        pc.by_component.get("embedding", 0) if arch.tie_word_embeddings else 0
    )
    body = matmul_params_per_token(arch) - lm_head
    bw, peak = gpu.bandwidth_bytes_per_s, gpu.flops_per_s
    eff_bw, eff_c = gpu.decode_efficiency, gpu.prefill_efficiency
    # (tick, memory time, compute time, weight bytes, KV bytes, FLOPs) of the slowest stage
    slowest: tuple[float, float, float, float, float, float] | None = None
    for stage, (start, end) in enumerate(stages):
        w_bytes = decode_weight_bytes_read(arch, micro, w_prec, tp, pp, stage)
        kv_bytes = micro * kv_cache_bytes_per_sequence(arch, context_len, kv_dt, tp, None, pp, stage)
        share = (end - start) / arch.num_layers
        params = body * share + (lm_head if stage == pp - 1 else 0)
        flops = micro * (2 * params + attention_flops_decode(arch, context_len) * share) / tp
        mem_t, comp_t = (w_bytes + kv_bytes) / bw, flops / peak
        tick = max(mem_t / eff_bw, comp_t / eff_c)
        if slowest is None or tick > slowest[0]:
            slowest = (tick, mem_t, comp_t, w_bytes, kv_bytes, flops)
    assert slowest is not None
    tick, mem_time, compute_time, w_bytes, kv_bytes, stage_flops = slowest
    step = pp * tick  # a sequence's next token comes back after a tick on every stage
    return DecodeEstimate(
        gpu=gpu.name,
        batch_size=batch_size,
        context_len=context_len,
        tensor_parallel_size=tp,
        weight_bytes_read=w_bytes,
        kv_bytes_read=float(kv_bytes),
        flops=stage_flops,
        bandwidth_efficiency=eff_bw,
        compute_efficiency=eff_c,
        step_time_s=step,
        tokens_per_s=batch_size / step,
        bandwidth_roofline_tokens_per_s=batch_size / (pp * mem_time),
        compute_roofline_tokens_per_s=batch_size / (pp * compute_time),
        pipeline_parallel_size=pp,
    )


@dataclass(frozen=True)
class PrefillEstimate:
    """Processing ``num_tokens`` prompt tokens of one request alone (time to first token, no queueing)."""

    gpu: str
    num_tokens: int
    tensor_parallel_size: int
    flops: float
    time_s: float
    compute_bound_time_s: float
    memory_bound_time_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def prefill_flops(arch: ModelArch, num_tokens: int) -> float:
    """FLOPs of a prompt's forward pass: 2 per parameter per token (the output layer only for the last token,
    which is the one that samples) plus causal attention."""
    pc = param_count(arch)
    lm_head = pc.by_component.get("lm_head", 0) or (
        pc.by_component.get("embedding", 0) if arch.tie_word_embeddings else 0
    )
    body = matmul_params_per_token(arch) - lm_head
    return 2.0 * body * num_tokens + 2.0 * lm_head + attention_flops_prefill(arch, num_tokens)


def prefill_estimate(
    arch: ModelArch,
    gpu: GPUSpec,
    num_tokens: int,
    precision: object = "auto",
    tensor_parallel_size: int = 1,
    max_num_batched_tokens: int = 8192,
) -> PrefillEstimate:
    """Time to run a prompt of ``num_tokens`` tokens. Chunked prefill reads all weights once per chunk of
    ``max_num_batched_tokens``; the matmuls are usually compute-bound."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    check_tensor_parallel_size(arch, tensor_parallel_size)
    tp = tensor_parallel_size
    flops = prefill_flops(arch, num_tokens) / tp
    chunks = -(-num_tokens // max_num_batched_tokens)
    wb = weight_bytes(arch, precision, tp)  # type: ignore[arg-type]
    read = (wb.total - wb.by_component.get("vision", 0)) * chunks
    compute_t = flops / (gpu.flops_per_s * gpu.prefill_efficiency)
    memory_t = read / (gpu.bandwidth_bytes_per_s * gpu.decode_efficiency)
    return PrefillEstimate(
        gpu=gpu.name,
        num_tokens=num_tokens,
        tensor_parallel_size=tp,
        flops=flops,
        time_s=max(compute_t, memory_t),
        compute_bound_time_s=compute_t,
        memory_bound_time_s=memory_t,
    )


@dataclass(frozen=True)
class ServingEstimate:
    """Steady state of ``concurrency`` sequences under continuous batching, each request being ``input_len``
    prompt tokens then ``output_len`` generated tokens.

    One cycle serves ``concurrency`` requests: their prefill compute plus ``output_len`` decode steps at the
    mean context input_len + output_len / 2.
    """

    concurrency: int
    input_len: int
    output_len: int
    decode: DecodeEstimate
    prefill_time_s: float  # compute time of one request's prompt inside a busy batch
    ttft_s: float  # one request's prompt on an idle device
    requests_per_s: float
    output_tokens_per_s: float  # all devices together

    @property
    def output_tokens_per_s_per_gpu(self) -> float:
        return self.output_tokens_per_s / self.decode.num_gpus

    def to_dict(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "input_len": self.input_len,
            "output_len": self.output_len,
            "decode": self.decode.to_dict(),
            "prefill_time_s": self.prefill_time_s,
            "ttft_s": self.ttft_s,
            "inter_token_latency_s": self.decode.step_time_s,
            "requests_per_s": self.requests_per_s,
            "output_tokens_per_s": self.output_tokens_per_s,
            "output_tokens_per_s_per_gpu": self.output_tokens_per_s_per_gpu,
        }


def serving_estimate(
    arch: ModelArch,
    gpu: GPUSpec,
    concurrency: int,
    input_len: int,
    output_len: int,
    precision: object = "auto",
    kv_dtype: object = "auto",
    tensor_parallel_size: int = 1,
    max_num_batched_tokens: int = 8192,
    pipeline_parallel_size: int = 1,
) -> ServingEstimate:
    """Requests/s and output tokens/s when ``concurrency`` requests are always in flight. With pipeline stages
    a prompt still crosses every stage in turn (the time to first token is unchanged), but the stages work on
    different prompts at once, so the busy time a prompt costs the deployment is divided by them."""
    if output_len < 1 or input_len < 1:
        raise ValueError(f"input_len and output_len must be >= 1, got {input_len} and {output_len}")
    decode = decode_estimate(
        arch, gpu, concurrency, input_len + output_len // 2, precision, kv_dtype, tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
    )
    pre = prefill_estimate(arch, gpu, input_len, precision, tensor_parallel_size, max_num_batched_tokens)
    cycle = concurrency * pre.compute_bound_time_s / pipeline_parallel_size + output_len * decode.step_time_s
    return ServingEstimate(
        concurrency=concurrency,
        input_len=input_len,
        output_len=output_len,
        decode=decode,
        prefill_time_s=pre.compute_bound_time_s,
        ttft_s=pre.time_s,
        requests_per_s=concurrency / cycle,
        output_tokens_per_s=concurrency * output_len / cycle,
    )
