"""The whole answer for one model: memory, fit on each device, speed and cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tokenmill.planner.arch import ModelArch, load_arch
from tokenmill.planner.cost import WORKLOADS, CostEstimate, cost_estimate
from tokenmill.planner.dtypes import Precision
from tokenmill.planner.fit import (
    MemoryBreakdown,
    ServingConfig,
    max_concurrency,
    max_model_len,
    memory_breakdown,
    min_tensor_parallel_size,
)
from tokenmill.planner.gpus import GPUSpec, get_gpu, list_gpus
from tokenmill.planner.memory import (
    kv_cache_bytes_per_sequence,
    kv_cache_bytes_per_token,
    kv_dtype_for,
    pipeline_stage_layers,
    resolve_precision,
    valid_tensor_parallel_sizes,
    weight_bytes,
)
from tokenmill.planner.parallel import PipelinePlan, TPCommunication, pipeline_plan, tp_communication
from tokenmill.planner.params import ParamCount, param_count
from tokenmill.planner.perf import PrefillEstimate, ServingEstimate, prefill_estimate, serving_estimate


@dataclass(frozen=True)
class Workload:
    """What the deployment must serve.

    context_len: tokens per sequence the KV cache must hold (prompt + output), like vLLM's max_model_len.
    concurrency: sequences in flight at once.
    input_len / output_len: a typical request, for throughput and cost; default output_len is
      min(512, context_len // 4) and input_len the rest of the context.
    utilization: fraction of the time the deployment is busy (for cost per token).
    workload: "realtime" (latency-bound, interactive) or "batch" (offline, interruptible).
    api_price_input/output: an API's $ per 1M tokens, for the break-even.
    """

    context_len: int = 4096
    concurrency: int = 16
    input_len: int | None = None
    output_len: int | None = None
    utilization: float = 0.5
    workload: str = "realtime"
    api_price_input: float | None = None
    api_price_output: float | None = None

    def __post_init__(self) -> None:
        if self.context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {self.context_len}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"utilization must be in (0, 1], got {self.utilization}: use e.g. 0.5")
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        if self.output_len is not None and self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")
        if self.input_len is not None and self.input_len < 1:
            raise ValueError(f"input_len must be >= 1, got {self.input_len}")
        if self.context_len < 2 and (self.input_len is None or self.output_len is None):
            raise ValueError("context_len must be >= 2 to hold a prompt and an output: raise --context")
        if (self.input_len or 0) + (self.output_len or 0) > self.context_len:
            raise ValueError(
                f"input_len + output_len = {(self.input_len or 0) + (self.output_len or 0)} exceeds context_len="
                f"{self.context_len}: raise --context or shorten the request"
            )

    @property
    def resolved_output_len(self) -> int:
        if self.output_len is not None:
            return self.output_len
        if self.input_len is not None:
            return max(1, self.context_len - self.input_len)
        return max(1, min(512, self.context_len // 4))

    @property
    def resolved_input_len(self) -> int:
        if self.input_len is not None:
            return self.input_len
        return max(1, self.context_len - self.resolved_output_len)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(input_len=self.resolved_input_len, output_len=self.resolved_output_len)
        return d


@dataclass(frozen=True)
class GPUPlan:
    """The answer for one device type."""

    gpu: GPUSpec
    status: str  # "fits" | "partial" | "no"
    tensor_parallel_size: int | None
    max_concurrency: int  # at the workload's context_len, at tensor_parallel_size
    max_model_len: int  # for the workload's concurrency (or max_concurrency when partial)
    memory: MemoryBreakdown | None
    serving: ServingEstimate | None = None
    prefill: PrefillEstimate | None = None
    cost: CostEstimate | None = None
    notes: list[str] = field(default_factory=list)
    pipeline_parallel_size: int = 1
    tp_communication: TPCommunication | None = None  # when tensor_parallel_size > 1
    pipeline: PipelinePlan | None = None  # when pipeline_parallel_size > 1

    @property
    def num_gpus(self) -> int:
        return (self.tensor_parallel_size or 0) * self.pipeline_parallel_size

    def to_dict(self) -> dict:
        return {
            "gpu": self.gpu.to_dict(),
            "status": self.status,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "num_gpus": self.num_gpus,
            "max_concurrency": self.max_concurrency,
            "max_model_len": self.max_model_len,
            "memory": self.memory.to_dict() if self.memory else None,
            "serving": self.serving.to_dict() if self.serving else None,
            "prefill": self.prefill.to_dict() if self.prefill else None,
            "cost": self.cost.to_dict() if self.cost else None,
            "tp_communication": self.tp_communication.to_dict() if self.tp_communication else None,
            "pipeline": self.pipeline.to_dict() if self.pipeline else None,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class Plan:
    arch: ModelArch
    params: ParamCount
    precision: str
    kv_dtype: str
    weight_bytes: int  # whole model, one copy
    kv_bytes_per_token: int  # every layer, no tensor parallelism
    kv_bytes_per_sequence: int  # at context_len, sliding windows capped
    workload: Workload
    serving_config: ServingConfig
    gpus: list[GPUPlan]
    pipeline_parallel_size: int = 1

    @property
    def fitting(self) -> list[GPUPlan]:
        return [g for g in self.gpus if g.status == "fits"]

    @property
    def best(self) -> GPUPlan | None:
        """The fitting device with the lowest cost per 1M output tokens (on-demand), else the fastest."""
        candidates = self.fitting or [g for g in self.gpus if g.status == "partial"]
        if not candidates:
            return None

        def key(g: GPUPlan) -> tuple[int, float]:
            c = g.cost.cost_per_1m_output_on_demand if g.cost else None
            if c is not None:
                return (0, c)
            tps = g.serving.output_tokens_per_s if g.serving else 0.0
            return (1, -tps)

        return min(candidates, key=key)

    def to_dict(self) -> dict:
        a = self.arch
        best = self.best
        return {
            "model": {
                "name": a.name,
                "model_type": a.model_type,
                "source": a.source,
                "params_total": self.params.total,
                "params_active": self.params.active,
                "params_by_component": self.params.by_component,
                "num_layers": a.num_layers,
                "hidden_size": a.hidden_size,
                "num_attention_heads": a.num_attention_heads,
                "num_kv_heads": a.num_kv_heads,
                "head_dim": a.head_dim,
                "attention": "mla"
                if a.is_mla
                else ("gqa" if a.num_kv_heads < a.num_attention_heads else "mha"),
                "sliding_window": a.sliding_window,
                "num_sliding_window_layers": a.num_sliding_layers,
                "num_experts": a.num_experts,
                "num_experts_per_tok": a.num_experts_per_tok,
                "max_position_embeddings": a.max_position_embeddings,
                "valid_tensor_parallel_sizes": valid_tensor_parallel_sizes(a, 8),
            },
            "precision": self.precision,
            "kv_dtype": self.kv_dtype,
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_bytes_per_sequence": self.kv_bytes_per_sequence,
            "workload": self.workload.to_dict(),
            "serving_config": self.serving_config.to_dict(),
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "best_gpu": best.gpu.name if best else None,
            "gpus": [g.to_dict() for g in self.gpus],
        }


def plan_gpu(
    arch: ModelArch,
    gpu: GPUSpec,
    workload: Workload,
    serving: ServingConfig,
    tensor_parallel_size: int | None = None,
    pipeline_parallel_size: int = 1,
) -> GPUPlan:
    """Fit, speed and cost of ``arch`` on one device type (``pipeline_parallel_size`` stages of
    ``tensor_parallel_size`` devices each; tensor_parallel_size None: the smallest that fits)."""
    ctx, conc = workload.context_len, workload.concurrency
    pp = pipeline_parallel_size
    notes: list[str] = []
    if tensor_parallel_size is not None:
        n = max_concurrency(arch, gpu, ctx, serving, tensor_parallel_size, pp)
        status = "fits" if n >= conc else ("partial" if n >= 1 else "no")
        tp: int | None = tensor_parallel_size
    else:
        fit = min_tensor_parallel_size(arch, gpu, ctx, conc, serving, pipeline_parallel_size=pp)
        status, tp, n = fit.status, fit.tensor_parallel_size, fit.max_concurrency
    if status == "no" or tp is None:
        # Show the closest miss: the largest split allowed.
        shown_tp = tp or max(valid_tensor_parallel_sizes(arch, gpu.max_tensor_parallel_size))
        mem = memory_breakdown(arch, gpu, ctx, 0, serving, shown_tp, pp)
        fixed = (mem.total - mem.kv_cache) / 2**30
        where = f"tensor_parallel_size={shown_tp}" + (
            f", pipeline stage {mem.pipeline_stage} of {pp}" if pp > 1 else ""
        )
        if mem.kv_cache_budget <= 0:
            notes.append(
                f"weights + activations + overhead need {fixed:.1f} GiB per device at {where}, above the usable "
                f"{mem.budget / 2**30:.1f} GiB: "
                + (
                    "use a larger device"
                    if resolve_precision(arch, serving.precision, serving.group_size).weight_bytes < 1
                    else "quantize (--precision int4-awq or fp8) or use a larger device"
                )
                + (" or more pipeline stages (--pipeline-parallel-size)" if gpu.kind == "gpu" else "")
            )
        else:
            notes.append(
                f"the {mem.kv_cache_budget / 2**30:.1f} GiB left for the KV cache at {where} "
                f"cannot hold one sequence of {ctx} tokens: lower --context or use --kv-dtype fp8"
            )
        return GPUPlan(gpu, "no", tp, 0, 0, mem, notes=notes, pipeline_parallel_size=pp)
    batch = min(conc, n)
    if status == "partial":
        notes.append(f"only {n} of {conc} sequences of {ctx} tokens fit: the rest would queue")
    mem = memory_breakdown(arch, gpu, ctx, batch, serving, tp, pp)
    mml = max_model_len(arch, gpu, batch, serving, tp, pp)
    max_tokens = serving.batched_tokens_for(gpu)
    # "auto" keeps a GGUF file's exact bytes; anything else is planned as given, with its group size.
    weights_precision: str | Precision = (
        "auto"
        if serving.precision.lower() == "auto"
        else resolve_precision(arch, serving.precision, serving.group_size)
    )
    srv = serving_estimate(
        arch,
        gpu,
        batch,
        workload.resolved_input_len,
        workload.resolved_output_len,
        weights_precision,
        serving.kv_dtype,
        tp,
        max_tokens,
        pp,
    )
    pre = prefill_estimate(arch, gpu, workload.resolved_input_len, weights_precision, tp, max_tokens)
    cost = cost_estimate(
        gpu,
        tp * pp,
        srv.output_tokens_per_s,
        srv.requests_per_s,
        workload.resolved_input_len,
        workload.resolved_output_len,
        workload.utilization,
        workload.workload,
        workload.api_price_input,
        workload.api_price_output,
    )
    comm = None
    if tp > 1:
        comm = tp_communication(
            arch, tp, batch, gpu, srv.decode.context_len, weights_precision, serving.kv_dtype
        )
    pipe = None
    if pp > 1:
        pipe = pipeline_plan(
            arch, pp, tp, weights_precision, serving.kv_dtype, serving.group_size, batch, max_tokens
        )
    if gpu.kind != "gpu":
        notes.append(f"{gpu.kind} estimate: memory capped at {gpu.max_usable_fraction:.0%} of RAM")
    return GPUPlan(gpu, status, tp, n, mml, mem, srv, pre, cost, notes, pp, comm, pipe)


def plan(
    model: str | ModelArch,
    gpus: list[str | GPUSpec] | None = None,
    workload: Workload | None = None,
    serving: ServingConfig | None = None,
    tensor_parallel_size: int | None = None,
    catalog: dict[str, GPUSpec] | None = None,
    pipeline_parallel_size: int = 1,
) -> Plan:
    """Plan ``model`` on the given devices (default: every GPU in the catalog), in ``pipeline_parallel_size``
    pipeline stages (their layers split by pipeline_stage_layers, as the engine splits them).

    When no GPU fits the weights, CPU and Apple-Silicon estimates are added.
    """
    arch = load_arch(model) if not isinstance(model, ModelArch) else model
    pipeline_stage_layers(arch.num_layers, pipeline_parallel_size)  # a clear error for an invalid size
    workload = workload or Workload(context_len=min(4096, arch.max_position_embeddings))
    serving = serving or ServingConfig()
    if workload.context_len > arch.max_position_embeddings:
        raise ValueError(
            f"context_len={workload.context_len} exceeds {arch.name}'s max_position_embeddings="
            f"{arch.max_position_embeddings}: lower --context"
        )
    devices = (
        [get_gpu(g, catalog) for g in gpus] if gpus else [g for g in list_gpus(catalog) if g.kind == "gpu"]
    )
    pp = pipeline_parallel_size
    results = [plan_gpu(arch, g, workload, serving, tensor_parallel_size, pp) for g in devices]
    if not any(r.status != "no" for r in results):
        seen = {r.gpu.name for r in results}
        for g in list_gpus(catalog):
            if g.kind != "gpu" and g.name not in seen:
                results.append(plan_gpu(arch, g, workload, serving, None, pp))
    precision = resolve_precision(arch, serving.precision, serving.group_size)
    kv_dtype = kv_dtype_for(precision, serving.kv_dtype)
    return Plan(
        arch=arch,
        params=param_count(arch),
        precision=precision.name,
        kv_dtype=kv_dtype,
        weight_bytes=weight_bytes(arch, serving.precision, 1, serving.group_size).total,
        kv_bytes_per_token=kv_cache_bytes_per_token(arch, kv_dtype),
        kv_bytes_per_sequence=kv_cache_bytes_per_sequence(arch, workload.context_len, kv_dtype),
        workload=workload,
        serving_config=serving,
        gpus=results,
        pipeline_parallel_size=pp,
    )
