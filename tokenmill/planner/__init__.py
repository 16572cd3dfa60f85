"""Capacity planner: what a model needs in memory, which devices fit it, how fast it runs and what it costs.

The engine sizes its KV cache with the same functions (``kv_cache_bytes_per_block``,
``activation_peak_bytes``, ``weight_bytes``), so the plan and the running engine agree.

    >>> from tokenmill.planner import load_arch, param_count, kv_cache_bytes_per_token
    >>> arch = load_arch("Llama-3.1-8B")
    >>> param_count(arch).total
    8030261248
    >>> kv_cache_bytes_per_token(arch, "bf16")
    131072
"""

from tokenmill.planner.arch import ModelArch, load_arch
from tokenmill.planner.cost import (
    BreakEven,
    CostEstimate,
    break_even,
    cost_estimate,
    cost_per_million_tokens,
    recommend_pricing,
)
from tokenmill.planner.dtypes import PRECISION_NAMES, Precision, dtype_bytes, normalize_dtype, parse_precision
from tokenmill.planner.fit import (
    FitResult,
    MemoryBreakdown,
    ServingConfig,
    max_concurrency,
    max_model_len,
    memory_breakdown,
    memory_budget,
    min_tensor_parallel_size,
    stage_memory_breakdowns,
)
from tokenmill.planner.gpus import GPU_CATALOG, PRICE_DATE, GPUSpec, get_gpu, list_gpus, load_gpu_catalog
from tokenmill.planner.memory import (
    Overhead,
    WeightBytes,
    activation_peak_bytes,
    check_tensor_parallel_size,
    engine_weight_bytes,
    kv_cache_bytes_per_block,
    kv_cache_bytes_per_sequence,
    kv_cache_bytes_per_token,
    kv_cache_bytes_per_token_per_layer,
    kv_dtype_for,
    num_kv_heads_per_rank,
    overhead_bytes,
    pipeline_stage_layers,
    resolve_precision,
    stage_layer_range,
    valid_tensor_parallel_sizes,
    weight_bytes,
)
from tokenmill.planner.models import MODEL_CONFIGS, get_model_config, list_models, resolve_model_name
from tokenmill.planner.parallel import (
    PipelinePlan,
    PipelineStage,
    TPCommunication,
    pipeline_plan,
    tp_communication,
)
from tokenmill.planner.params import ParamCount, TensorGroup, param_count, tensor_groups
from tokenmill.planner.perf import (
    DecodeEstimate,
    PrefillEstimate,
    ServingEstimate,
    decode_estimate,
    prefill_estimate,
    serving_estimate,
)
from tokenmill.planner.plan import GPUPlan, Plan, Workload, plan, plan_gpu

__all__ = [
    "GPU_CATALOG",
    "MODEL_CONFIGS",
    "PRECISION_NAMES",
    "PRICE_DATE",
    "BreakEven",
    "CostEstimate",
    "DecodeEstimate",
    "FitResult",
    "GPUPlan",
    "GPUSpec",
    "MemoryBreakdown",
    "ModelArch",
    "Overhead",
    "ParamCount",
    "Plan",
    "Precision",
    "PrefillEstimate",
    "ServingConfig",
    "ServingEstimate",
    "TensorGroup",
    "WeightBytes",
    "Workload",
    "activation_peak_bytes",
    "break_even",
    "check_tensor_parallel_size",
    "cost_estimate",
    "cost_per_million_tokens",
    "decode_estimate",
    "dtype_bytes",
    "get_gpu",
    "get_model_config",
    "kv_cache_bytes_per_block",
    "kv_cache_bytes_per_sequence",
    "kv_cache_bytes_per_token",
    "kv_cache_bytes_per_token_per_layer",
    "kv_dtype_for",
    "list_gpus",
    "list_models",
    "load_arch",
    "load_gpu_catalog",
    "max_concurrency",
    "max_model_len",
    "memory_breakdown",
    "memory_budget",
    "min_tensor_parallel_size",
    "normalize_dtype",
    "num_kv_heads_per_rank",
    "overhead_bytes",
    "param_count",
    "parse_precision",
    "plan",
    "plan_gpu",
    "prefill_estimate",
    "recommend_pricing",
    "resolve_model_name",
    "resolve_precision",
    "serving_estimate",
    "tensor_groups",
    "valid_tensor_parallel_sizes",
    "engine_weight_bytes",
    "pipeline_stage_layers",
    "weight_bytes",
    "PipelinePlan",
    "PipelineStage",
    "TPCommunication",
    "pipeline_plan",
    "stage_layer_range",
    "stage_memory_breakdowns",
    "tp_communication",
]
