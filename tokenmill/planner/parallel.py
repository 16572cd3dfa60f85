"""What tensor and pipeline parallelism cost beyond memory: the bytes their collectives move per step.

Tensor parallelism (Megatron-style, as the engine splits a Llama layer): every decoder layer ends its attention
(o_proj) and its MLP (down_proj) with a row-parallel matmul whose partial sums are all-reduced, a
[tokens, hidden] tensor each; the vocab-parallel embedding is all-reduced once more (each rank looks up the rows
of its vocab shard); the lm_head's logits, [tokens, vocab / tp] on each rank, are all-gathered for sampling.
On a ring of N devices an all-reduce makes each device send 2 (N - 1) / N of the payload (reduce-scatter,
then all-gather) and an all-gather (N - 1) / N of the gathered tensor:

    bytes_sent_per_gpu = (2 * num_layers + 1) * 2 (N - 1) / N * tokens * hidden * dtype_bytes
                         + (N - 1) / N * tokens * vocab * dtype_bytes
    time = bytes_sent_per_gpu / interconnect bandwidth (per direction) + num_collectives * collective latency

Pipeline parallelism: each stage sends the next one its hidden states and residual, [tokens, hidden] each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from tokenmill.planner.arch import ModelArch
from tokenmill.planner.dtypes import dtype_bytes
from tokenmill.planner.gpus import GPUSpec
from tokenmill.planner.memory import (
    check_tensor_parallel_size,
    kv_cache_bytes_per_token,
    kv_dtype_for,
    pipeline_stage_layers,
    resolve_precision,
    weight_bytes,
)

# Largest batch searched for the point where communication overtakes the decode step's memory time.
_MAX_SEARCH_BATCH = 1 << 20


@dataclass(frozen=True)
class TPCommunication:
    """The collectives of one tensor-parallel step over ``num_tokens`` tokens (a decode step: one per sequence).

    Payloads are the tensors as each rank holds them; bytes_sent_per_gpu is what a ring makes each device send.
    Times are None without a device that has an interconnect (CPU, Apple Silicon, a custom entry without one).
    memory_time_s is the decode step's memory time on one device at peak bandwidth (its weight shard and its
    KV shard read once), the roofline the communication is compared with, also at peak.
    """

    tensor_parallel_size: int
    num_tokens: int
    dtype: str
    num_all_reduces: int  # 2 per decoder layer (after o_proj and down_proj) + 1 for the vocab-parallel embedding
    all_reduce_bytes: int  # payload of one all-reduce: [num_tokens, hidden]
    all_gather_bytes: int  # the logits gathered from every rank: [num_tokens, vocab]
    payload_bytes: int  # every all-reduce's payload + the gathered logits
    bytes_sent_per_gpu: float  # 2 (N-1)/N per all-reduce payload + (N-1)/N of the gathered logits
    interconnect: str | None = None
    interconnect_gbps: float | None = None
    bandwidth_time_s: float | None = None  # bytes_sent_per_gpu at the interconnect's peak
    latency_time_s: float | None = None  # one collective latency per all-reduce and for the all-gather
    memory_time_s: float | None = None
    context_len: int | None = None  # of the decode step whose memory time is compared
    # The decode batches (first, last; last None: every larger one) at which communication takes at least the
    # step's memory time; None when it never does below _MAX_SEARCH_BATCH sequences, or without an interconnect.
    # Both times grow linearly with the batch, so the batches form one range: the small ones when the
    # collectives' fixed latency exceeds the weight reads, the large ones when the link is slower per token than
    # the KV reads.
    dominates_batches: tuple[int, int | None] | None = None

    @property
    def time_s(self) -> float | None:
        if self.bandwidth_time_s is None or self.latency_time_s is None:
            return None
        return self.bandwidth_time_s + self.latency_time_s

    @property
    def ratio_to_memory_time(self) -> float | None:
        """Communication time / the decode step's memory time (above 1: communication dominates)."""
        if self.time_s is None or not self.memory_time_s:
            return None
        return self.time_s / self.memory_time_s

    @property
    def dominates(self) -> bool | None:
        ratio = self.ratio_to_memory_time
        return None if ratio is None else ratio >= 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(time_s=self.time_s, ratio_to_memory_time=self.ratio_to_memory_time, dominates=self.dominates)
        return d


def _tp_payloads(arch: ModelArch, tp: int, num_tokens: int, nbytes: int) -> tuple[int, int, int, float]:
    """(num_all_reduces, one all-reduce's bytes, the gathered logits' bytes, bytes each device sends)."""
    num_all_reduces = 2 * arch.num_layers + 1
    all_reduce = num_tokens * arch.hidden_size * nbytes
    all_gather = num_tokens * arch.vocab_size * nbytes
    sent = num_all_reduces * all_reduce * 2 * (tp - 1) / tp + all_gather * (tp - 1) / tp
    return num_all_reduces, all_reduce, all_gather, sent


def _dominated_batches(dominates: Callable[[int], bool]) -> tuple[int, int | None] | None:
    """The range of batches in [1, _MAX_SEARCH_BATCH] where ``dominates`` holds, for a predicate that holds on
    a prefix or a suffix of them (or on all or none)."""
    first, last = dominates(1), dominates(_MAX_SEARCH_BATCH)
    if first and last:
        return (1, None)
    if not first and not last:
        return None
    lo, hi = 1, _MAX_SEARCH_BATCH  # dominates(lo) == first, dominates(hi) == last
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if dominates(mid) == first:
            lo = mid
        else:
            hi = mid
    return (1, lo) if first else (hi, None)


def _decode_memory_time(
    arch: ModelArch, gpu: GPUSpec, batch: int, context_len: int, precision: object, kv_dtype: object, tp: int
) -> float:
    from tokenmill.planner.perf import decode_weight_bytes_read

    p = resolve_precision(arch, precision)  # type: ignore[arg-type]
    w_prec = "auto" if isinstance(precision, str) and precision.lower() == "auto" else p
    kv = batch * context_len * kv_cache_bytes_per_token(arch, kv_dtype_for(p, kv_dtype), tp)
    return (decode_weight_bytes_read(arch, batch, w_prec, tp) + kv) / gpu.bandwidth_bytes_per_s


def tp_communication(
    arch: ModelArch,
    tensor_parallel_size: int,
    num_tokens: int,
    gpu: GPUSpec | None = None,
    context_len: int = 0,
    precision: object = "auto",
    kv_dtype: object = "auto",
) -> TPCommunication:
    """The all-reduce and all-gather bytes of one tensor-parallel decode step of ``num_tokens`` sequences, and
    with a ``gpu``, the time they take on its interconnect beside the step's memory time (each sequence
    attending to ``context_len`` cached tokens).

    Llama-3.1-8B (32 layers, hidden 4096, vocab 128256) in bfloat16 at tp=2, one sequence: 65 all-reduces of
    8 KiB and 250.5 KiB of gathered logits; each GPU sends 65 * 8192 + 256512 / 2 bytes.

    >>> from tokenmill.planner import load_arch
    >>> c = tp_communication(load_arch("Llama-3.1-8B"), 2, 1)
    >>> c.num_all_reduces, c.all_reduce_bytes, c.all_gather_bytes, c.bytes_sent_per_gpu
    (65, 8192, 256512, 660736.0)
    """
    check_tensor_parallel_size(arch, tensor_parallel_size)
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
    if context_len < 0:
        raise ValueError(f"context_len must be >= 0, got {context_len}")
    tp = tensor_parallel_size
    dtype = resolve_precision(arch, precision).compute_dtype  # type: ignore[arg-type]
    nbytes = int(dtype_bytes(dtype))
    num_all_reduces, all_reduce, all_gather, sent = _tp_payloads(arch, tp, num_tokens, nbytes)
    comm = TPCommunication(
        tensor_parallel_size=tp,
        num_tokens=num_tokens,
        dtype=dtype,
        num_all_reduces=num_all_reduces,
        all_reduce_bytes=all_reduce,
        all_gather_bytes=all_gather,
        payload_bytes=num_all_reduces * all_reduce + all_gather,
        bytes_sent_per_gpu=sent,
    )
    bandwidth, latency = (gpu.interconnect_bytes_per_s, gpu.collective_latency_s) if gpu else (None, None)
    if gpu is None or bandwidth is None or latency is None:
        return comm
    num_collectives = num_all_reduces + 1 if tp > 1 else 0

    def comm_time(batch: int) -> float:
        return _tp_payloads(arch, tp, batch, nbytes)[3] / bandwidth + num_collectives * latency

    def dominates(batch: int) -> bool:
        return comm_time(batch) >= _decode_memory_time(arch, gpu, batch, context_len, precision, kv_dtype, tp)

    crossover = _dominated_batches(dominates) if tp > 1 else None
    return replace(
        comm,
        interconnect=gpu.interconnect,
        interconnect_gbps=gpu.interconnect_gbps,
        bandwidth_time_s=sent / bandwidth,
        latency_time_s=num_collectives * latency,
        memory_time_s=_decode_memory_time(arch, gpu, num_tokens, context_len, precision, kv_dtype, tp),
        context_len=context_len,
        dominates_batches=crossover,
    )


@dataclass(frozen=True)
class PipelineStage:
    """One pipeline stage, on each of its tensor-parallel ranks."""

    stage: int
    layers: tuple[int, int]  # [start, end) decoder layers
    has_embedding: bool
    has_lm_head: bool  # the final norm and the output layer (a tied embedding's own copy)
    weight_bytes: int  # per rank
    kv_bytes_per_token: int  # per rank, its layers only

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PipelinePlan:
    """The stage split and what crosses each boundary between stages per step.

    Between consecutive stages each tensor-parallel rank sends its peer the hidden states and the residual,
    2 * tokens * hidden * dtype_bytes; a step crosses pipeline_parallel_size - 1 boundaries.
    """

    pipeline_parallel_size: int
    tensor_parallel_size: int
    stages: list[PipelineStage]
    dtype: str
    activation_bytes_per_token: int  # sent across one boundary by one rank: hidden states + residual
    decode_tokens: int  # tokens of a decode step (its batch)
    decode_bytes_per_boundary: int  # one rank, one boundary, one decode step
    prefill_tokens: int  # tokens of a full prefill step (max_num_batched_tokens)
    prefill_bytes_per_boundary: int

    @property
    def largest_stage(self) -> int:
        """The stage holding the most weights (the first of equals)."""
        return max(self.stages, key=lambda s: s.weight_bytes).stage

    def to_dict(self) -> dict:
        return {
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "tensor_parallel_size": self.tensor_parallel_size,
            "stages": [s.to_dict() for s in self.stages],
            "largest_stage": self.largest_stage,
            "dtype": self.dtype,
            "activation_bytes_per_token": self.activation_bytes_per_token,
            "decode_tokens": self.decode_tokens,
            "decode_bytes_per_boundary": self.decode_bytes_per_boundary,
            "prefill_tokens": self.prefill_tokens,
            "prefill_bytes_per_boundary": self.prefill_bytes_per_boundary,
        }


def pipeline_plan(
    arch: ModelArch,
    pipeline_parallel_size: int,
    tensor_parallel_size: int = 1,
    precision: object = "auto",
    kv_dtype: object = "auto",
    group_size: int | None = None,
    decode_tokens: int = 1,
    prefill_tokens: int = 8192,
) -> PipelinePlan:
    """The stages of ``arch`` split over ``pipeline_parallel_size`` (pipeline_stage_layers, as the engine
    splits them): each one's layers, weight and KV bytes per rank, and the activations sent between stages.

    Llama-3.1-8B in bfloat16 over 2 stages: 16 layers each, the embedding on the first, the lm_head on the last.

    >>> from tokenmill.planner import load_arch
    >>> p = pipeline_plan(load_arch("Llama-3.1-8B"), 2, precision="bf16")
    >>> [(s.layers, s.weight_bytes) for s in p.stages]
    [((0, 16), 8030257152), ((16, 32), 8030265344)]
    """
    check_tensor_parallel_size(arch, tensor_parallel_size)
    pp, tp = pipeline_parallel_size, tensor_parallel_size
    splits = pipeline_stage_layers(arch.num_layers, pp)
    for name, value in (("decode_tokens", decode_tokens), ("prefill_tokens", prefill_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    p = resolve_precision(arch, precision, group_size)  # type: ignore[arg-type]
    kv_dt = kv_dtype_for(p, kv_dtype)
    stages = [
        PipelineStage(
            stage=i,
            layers=layers,
            has_embedding=i == 0,
            has_lm_head=i == pp - 1,
            weight_bytes=weight_bytes(arch, precision, tp, group_size, pp, i).total,  # type: ignore[arg-type]
            kv_bytes_per_token=kv_cache_bytes_per_token(arch, kv_dt, tp, pp, i),
        )
        for i, layers in enumerate(splits)
    ]
    per_token = 2 * arch.hidden_size * int(dtype_bytes(p.compute_dtype))
    return PipelinePlan(
        pipeline_parallel_size=pp,
        tensor_parallel_size=tp,
        stages=stages,
        dtype=p.compute_dtype,
        activation_bytes_per_token=per_token,
        decode_tokens=decode_tokens,
        decode_bytes_per_boundary=per_token * decode_tokens,
        prefill_tokens=prefill_tokens,
        prefill_bytes_per_boundary=per_token * prefill_tokens,
    )
