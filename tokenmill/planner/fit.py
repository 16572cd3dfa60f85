"""Does it fit? Memory on one device for a workload, max concurrency, max context, tensor-parallel size."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tokenmill.planner.arch import ModelArch
from tokenmill.planner.gpus import GPUSpec
from tokenmill.planner.memory import (
    GiB,
    activation_peak_bytes,
    check_tensor_parallel_size,
    kv_cache_bytes_per_sequence,
    kv_dtype_for,
    overhead_bytes,
    pipeline_stage_layers,
    resolve_precision,
    valid_tensor_parallel_sizes,
    weight_bytes,
)


@dataclass(frozen=True)
class ServingConfig:
    """Engine settings that change memory, named as in vLLM."""

    precision: str = (
        "auto"  # weights: auto (as stored), fp32, bf16, fp16, fp8, int8, int4-awq, int4-gptq, q4_k_m, ...
    )
    group_size: int | None = None  # AWQ/GPTQ group size; None: the checkpoint's, else 128
    kv_dtype: str = "auto"  # KV cache: auto (activation dtype), bfloat16, float16, fp8
    gpu_memory_utilization: float = 0.9  # fraction of device memory the engine may use, everything included
    max_num_batched_tokens: int | None = (
        None  # tokens per forward pass; None: 8192 on >= 70 GiB devices, else 2048
    )
    max_num_seqs: int = 256
    block_size: int = 16
    enforce_eager: bool = False  # no CUDA graphs: saves their memory, costs decode speed

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}: use e.g. 0.9"
            )
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}: use 16")

    def batched_tokens_for(self, gpu: GPUSpec) -> int:
        """vLLM's default chunked-prefill budget: 8192 tokens on GPUs with >= 70 GiB, else 2048 (CPU and Apple
        Silicon too)."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 8192 if gpu.kind == "gpu" and gpu.memory_gib >= 70 else 2048

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one device (one tensor-parallel rank) for ``num_sequences`` sequences of ``context_len``.

    With pipeline parallelism, those of one stage (``pipeline_stage``, decoder layers ``stage_layers``).
    """

    gpu: str
    tensor_parallel_size: int
    context_len: int
    num_sequences: int
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    overhead_parts: dict[str, int] = field(default_factory=dict)
    capacity: int = 0  # device memory
    budget: int = 0  # what the engine may use: capacity * min(gpu_memory_utilization, device cap)
    pipeline_parallel_size: int = 1
    pipeline_stage: int = 0
    stage_layers: tuple[int, int] | None = None  # [start, end) decoder layers of the stage

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead

    @property
    def kv_cache_budget(self) -> int:
        """Memory left for the KV cache after weights, activations and overhead (negative: weights don't fit)."""
        return self.budget - self.weights - self.activations - self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total=self.total, kv_cache_budget=self.kv_cache_budget, fits=self.fits)
        return d

    def gib(self) -> dict[str, float]:
        return {
            k: round(v / GiB, 2)
            for k, v in (
                ("weights", self.weights),
                ("kv_cache", self.kv_cache),
                ("activations", self.activations),
                ("overhead", self.overhead),
                ("total", self.total),
                ("budget", self.budget),
            )
        }


def memory_budget(gpu: GPUSpec, serving: ServingConfig) -> int:
    """Bytes the engine may use on ``gpu``."""
    return int(gpu.memory_bytes * min(serving.gpu_memory_utilization, gpu.max_usable_fraction))


def stage_memory_breakdowns(
    arch: ModelArch,
    gpu: GPUSpec,
    context_len: int,
    num_sequences: int,
    serving: ServingConfig | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
) -> list[MemoryBreakdown]:
    """Memory of one device of each pipeline stage serving ``num_sequences`` concurrent sequences of
    ``context_len`` tokens (one entry without pipeline parallelism). Each stage holds its layers' weights and
    KV cache; the first adds the embedding, the last the final norm, the lm_head and the logits."""
    serving = serving or ServingConfig()
    check_tensor_parallel_size(arch, tensor_parallel_size)
    if num_sequences < 0:
        raise ValueError(f"num_sequences must be >= 0, got {num_sequences}")
    pp = pipeline_parallel_size
    stages = pipeline_stage_layers(arch.num_layers, pp)
    precision = resolve_precision(arch, serving.precision, serving.group_size)
    kv_dtype = kv_dtype_for(precision, serving.kv_dtype)
    tp = tensor_parallel_size
    overhead = overhead_bytes(gpu.kind, tp, serving.enforce_eager, pp)
    result = []
    for stage, layers in enumerate(stages):
        weights = weight_bytes(arch, serving.precision, tp, serving.group_size, pp, stage).total
        per_seq = kv_cache_bytes_per_sequence(arch, context_len, kv_dtype, tp, serving.block_size, pp, stage)
        activations = activation_peak_bytes(
            arch, serving.batched_tokens_for(gpu), precision.compute_dtype, tp, serving.max_num_seqs,
            include_logits=stage == pp - 1,
        )
        result.append(MemoryBreakdown(
            gpu=gpu.name,
            tensor_parallel_size=tp,
            context_len=context_len,
            num_sequences=num_sequences,
            weights=weights,
            kv_cache=per_seq * num_sequences,
            activations=activations,
            overhead=overhead.total,
            overhead_parts=asdict(overhead),
            capacity=gpu.memory_bytes,
            budget=memory_budget(gpu, serving),
            pipeline_parallel_size=pp,
            pipeline_stage=stage,
            stage_layers=layers,
        ))
    return result


def memory_breakdown(
    arch: ModelArch,
    gpu: GPUSpec,
    context_len: int,
    num_sequences: int,
    serving: ServingConfig | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
) -> MemoryBreakdown:
    """Memory of one device serving ``num_sequences`` concurrent sequences of ``context_len`` tokens; with
    pipeline parallelism, the device of the stage that needs the most (it decides whether the workload fits)."""
    stages = stage_memory_breakdowns(
        arch, gpu, context_len, num_sequences, serving, tensor_parallel_size, pipeline_parallel_size
    )
    return max(stages, key=lambda m: m.total)  # the first of equals


def max_concurrency(
    arch: ModelArch,
    gpu: GPUSpec,
    context_len: int,
    serving: ServingConfig | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
) -> int:
    """How many sequences of ``context_len`` tokens fit in the KV cache at once (0: not even one); with
    pipeline parallelism, in every stage's KV cache."""
    serving = serving or ServingConfig()
    stages = stage_memory_breakdowns(
        arch, gpu, context_len, 1, serving, tensor_parallel_size, pipeline_parallel_size
    )
    if any(mem.kv_cache_budget <= 0 for mem in stages):
        return 0
    return min(mem.kv_cache_budget // max(mem.kv_cache, 1) for mem in stages)  # kv_cache: one sequence


def max_model_len(
    arch: ModelArch,
    gpu: GPUSpec,
    num_sequences: int,
    serving: ServingConfig | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
) -> int:
    """The longest context (capped at the model's max_position_embeddings) at which ``num_sequences``
    sequences fit at once (in every pipeline stage); 0 when not even one block per sequence fits."""
    serving = serving or ServingConfig()
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    pp = pipeline_parallel_size
    stages = stage_memory_breakdowns(arch, gpu, 0, 0, serving, tensor_parallel_size, pp)
    precision = resolve_precision(arch, serving.precision, serving.group_size)
    kv_dtype = kv_dtype_for(precision, serving.kv_dtype)

    def fits(length: int) -> bool:
        return all(
            kv_cache_bytes_per_sequence(
                arch, length, kv_dtype, tensor_parallel_size, serving.block_size, pp, mem.pipeline_stage
            ) * num_sequences <= mem.kv_cache_budget
            for mem in stages
        )

    lo, hi = 0, arch.max_position_embeddings
    if any(mem.kv_cache_budget <= 0 for mem in stages) or not fits(1):
        return 0
    if fits(hi):
        return hi
    while hi - lo > 1:  # KV bytes grow monotonically with length: binary search the last length that fits
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class FitResult:
    """Smallest tensor-parallel degree for a workload on one device type.

    status: "fits" (the requested concurrency fits at tensor_parallel_size), "partial" (the model fits, but
    only max_concurrency < requested sequences; tensor_parallel_size is then the largest allowed), "no" (the
    weights do not fit even on max_tensor_parallel_size devices).
    """

    gpu: str
    status: str
    tensor_parallel_size: int | None
    max_concurrency: int
    valid_sizes: list[int]


def min_tensor_parallel_size(
    arch: ModelArch,
    gpu: GPUSpec,
    context_len: int,
    num_sequences: int,
    serving: ServingConfig | None = None,
    max_size: int | None = None,
    pipeline_parallel_size: int = 1,
) -> FitResult:
    """The smallest tensor-parallel size (one that divides the head counts) at which ``num_sequences``
    sequences of ``context_len`` tokens fit on ``gpu`` (with ``pipeline_parallel_size`` stages)."""
    serving = serving or ServingConfig()
    limit = max_size or gpu.max_tensor_parallel_size
    sizes = valid_tensor_parallel_sizes(arch, limit)
    best = (0, None)
    for tp in sizes:
        n = max_concurrency(arch, gpu, context_len, serving, tp, pipeline_parallel_size)
        if n >= num_sequences:
            return FitResult(gpu.name, "fits", tp, n, sizes)
        if n > best[0]:
            best = (n, tp)
    if best[1] is not None:
        return FitResult(gpu.name, "partial", best[1], best[0], sizes)
    return FitResult(gpu.name, "no", None, 0, sizes)
