"""`tokenmill plan ... --emit helm-values`: a Helm values file for deploy/helm/tokenmill sized by the plan.

The values hold one engine tier (servingEngineSpec.modelSpec[0]) whose GPU count, tensorParallelSize,
gpuMemoryUtilization, maxModelLen and maxNumSeqs come from the plan, so a release is never sized for GPUs the
model does not fit. Host memory is requested for one full copy of the weights (the loader reads the checkpoint
through host memory) plus HOST_MEMORY_HEADROOM_GIB for the runtime; the shared-memory volume is sized for
tensor-parallel workers.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from tokenmill.planner.plan import GPUPlan, Plan

# Host memory beyond the weights: Python, torch, tokenizer, HTTP server, CUDA context on the host side.
HOST_MEMORY_HEADROOM_GIB = 4
# CPU cores requested per GPU: tokenization, scheduling and the HTTP server run on the host.
CPUS_PER_GPU = 4
# /dev/shm for tensor-parallel workers (NCCL falls back to shared memory between processes).
SHM_SIZE_TP = "8Gi"


def device_resource(vendor: str) -> str:
    """The extended resource a device plugin advertises for this vendor's GPUs."""
    return "amd.com/gpu" if vendor.upper() == "AMD" else "nvidia.com/gpu"


class NoFitError(ValueError):
    """Nothing in the plan fits the workload; the message is the planner's reason."""


def tier_name(model_name: str) -> str:
    """A DNS-1123 label from a model name (Kubernetes object names are built from it)."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower().rsplit("/", 1)[-1]).strip("-")
    return (name or "model")[:40].rstrip("-")


def choose_gpu(result: Plan) -> GPUPlan:
    """The cheapest device plan that serves the whole workload; NoFitError with the reasons otherwise."""
    # Only GPUs: the planner adds CPU and Apple-Silicon estimates when no GPU fits, and the chart schedules
    # onto GPU nodes.
    fitting = [g for g in result.fitting if g.gpu.kind == "gpu"]
    if fitting:

        def cost(g: GPUPlan) -> tuple[int, float]:
            c = g.cost.cost_per_1m_output_on_demand if g.cost else None
            return (0, c) if c is not None else (1, -(g.serving.output_tokens_per_s if g.serving else 0.0))

        return min(fitting, key=cost)
    w = result.workload
    reasons = []
    for g in result.gpus:
        if g.gpu.kind != "gpu":
            continue
        why = "; ".join(g.notes) or g.status
        reasons.append(f"{g.gpu.name}: {why}")
    raise NoFitError(
        f"{result.arch.name} does not fit {w.concurrency} sequences of {w.context_len} tokens on "
        + ("any GPU of the catalog" if not reasons else "the GPUs asked for")
        + (": " + " | ".join(reasons) if reasons else "")
        + ". Lower --concurrency or --context, quantize (--precision), or pick a larger --gpu"
    )


def helm_values(result: Plan, command: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """(values, header comment lines) for the chosen device plan."""
    if result.pipeline_parallel_size > 1:
        raise ValueError(
            f"--emit helm-values sizes one pod of tensor-parallel GPUs; the chart has no pipeline stages "
            f"(pipeline_parallel_size={result.pipeline_parallel_size}): drop --pipeline-parallel-size"
        )
    g = choose_gpu(result)
    w, serving = result.workload, result.serving_config
    tp = g.tensor_parallel_size or 1
    host_memory_gib = math.ceil(result.weight_bytes / 2**30 + HOST_MEMORY_HEADROOM_GIB)
    volume_gib = math.ceil(result.weight_bytes / 2**30 * 1.2 + 1)
    memory = f"{host_memory_gib}Gi"
    engine: dict[str, Any] = {
        "tensorParallelSize": tp,
        "gpuMemoryUtilization": serving.gpu_memory_utilization,
        "maxModelLen": w.context_len,
        "maxNumSeqs": w.concurrency,
    }
    if serving.block_size != 16:
        engine["blockSize"] = serving.block_size
    if serving.enforce_eager:
        engine["enforceEager"] = True
    tier: dict[str, Any] = {
        "name": tier_name(result.arch.name),
        "replicaCount": 1,
        "servedModelName": result.arch.name,
        "model": {
            # The checkpoint directory (or .gguf file) inside the models volume: copy it there, or set
            # model.download to fetch it with an init container.
            "source": "pvc",
            "path": result.arch.name.rsplit("/", 1)[-1],
            "volume": {"create": True, "size": f"{volume_gib}Gi"},
        },
        "engine": engine,
        "gpu": {"count": tp, "type": g.gpu.name, "resourceName": device_resource(g.gpu.vendor)},
        "resources": {
            "requests": {"cpu": str(CPUS_PER_GPU * tp), "memory": memory},
            "limits": {"memory": memory},
        },
    }
    if tp > 1:
        tier["shmSize"] = SHM_SIZE_TP
    if g.gpu.on_demand_per_hour is not None:
        # Cost metering: cost_usd of each request at the pod's GPU price (all its GPUs).
        tier["gpuHourlyCost"] = round(g.gpu.on_demand_per_hour * tp, 4)
    values = {"servingEngineSpec": {"modelSpec": [tier]}}
    mem = g.memory
    header = [
        "Helm values for deploy/helm/tokenmill, sized by tokenmill's planner.",
        *([f"  {command}"] if command else []),
        f"{result.arch.name} ({result.precision} weights, {result.kv_dtype} KV cache) on {tp} x {g.gpu.name} "
        f"(tensor_parallel_size={tp}): {w.concurrency} sequences of {w.context_len} tokens; the KV cache "
        f"holds up to {g.max_concurrency} at that length.",
    ]
    if mem is not None:
        header.append(
            f"Per GPU: {mem.total / 2**30:.1f} GiB planned of {mem.budget / 2**30:.1f} GiB usable "
            f"({serving.gpu_memory_utilization:g} x {g.gpu.memory_gib:g} GiB)."
        )
    header.append(f"Host memory: {result.weight_bytes / 2**30:.1f} GiB of weights + {HOST_MEMORY_HEADROOM_GIB} GiB.")
    return values, header


def to_yaml(data: Any, indent: int = 0) -> str:
    """A small YAML writer for plain dicts, lists and scalars (scalars written as JSON, which YAML reads)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, dict | list) and value:
                lines.append(f"{pad}{key}:")
                lines.append(to_yaml(value, indent + 2))
            else:
                lines.append(f"{pad}{key}: {json.dumps(value)}")
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict | list) and item:
                inner = to_yaml(item, indent + 2)
                lines.append(f"{pad}- {inner[indent + 2:]}")
            else:
                lines.append(f"{pad}- {json.dumps(item)}")
    else:
        lines.append(f"{pad}{json.dumps(data)}")
    return "\n".join(lines)


def format_helm_values(result: Plan, command: str | None = None) -> str:
    values, header = helm_values(result, command)
    return "".join(f"# {line}\n" for line in header) + to_yaml(values) + "\n"
