"""Frozen configuration of the engine: model, KV cache, scheduler.

Every ``validate()`` raises ``ValueError`` with a message that names the field, the value and the fix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}


def parse_size(value: int | float | str, name: str = "size") -> int:
    """Bytes from an int or a string such as "2GiB", "512MB", "1.5e9"."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number of bytes or a string like '2GiB', got {value!r}")
    if isinstance(value, int | float):
        result = int(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(
                f"{name}={value!r} is not a size: use bytes or a number with a unit, e.g. '2GiB', '512MiB', '4GB'"
            )
        result = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if result <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return result


DTYPE_ALIASES = {
    "auto": "auto",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}


# The environment variable that turns batch-invariant mode on (as VLLM_BATCH_INVARIANT does for vLLM) when
# batch_invariant is not given: 1/true/yes/on or 0/false/no/off.
BATCH_INVARIANT_ENV = "TOKENMILL_BATCH_INVARIANT"


def batch_invariant_from_env() -> bool:
    value = os.environ.get(BATCH_INVARIANT_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{BATCH_INVARIANT_ENV}={os.environ[BATCH_INVARIANT_ENV]!r} is not a switch: set it to 1 or 0")


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def emulated_dtype_warning(device: str, dtype: str) -> str | None:
    """A warning for a dtype this device only emulates (bfloat16 on a CPU without native bf16), or None."""
    if device == "cpu" and dtype == "bfloat16" and not cpu_supports_bf16():
        return ("dtype=bfloat16 on a CPU without native bf16 instructions (AVX512-BF16 or AMX): its matmuls are "
                "emulated, far slower than float32 here; --dtype auto (float32 on this CPU) runs faster")
    return None


@dataclass(frozen=True)
class ModelConfig:
    # A Hugging Face model directory, a .gguf file or a hub id ("org/name"); None: the bundled SmolLM2-135M-Instruct.
    model: str | None = None
    # Hub ids: the branch, tag or commit to load (default "main"), and the HF cache directory to download into
    # and read from (default: $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub).
    revision: str | None = None
    download_dir: str | None = None
    # "auto" (bf16 where the hardware runs it fast, else float16 on CUDA and float32 on CPU), "bfloat16",
    # "float16" or "float32"; resolve_defaults() turns "auto" and the aliases into one of the last three.
    dtype: str = "auto"
    # Longest prompt + output in tokens; None takes the model's limit capped by what the KV cache holds.
    max_model_len: int | None = None
    # Seed of the engine's random generator for requests without a seed of their own.
    seed: int = 0
    # "auto" (cuda when available, else cpu), "cpu" or "cuda"; resolve_defaults() settles "auto".
    device: str = "auto"
    # Jinja chat template overriding the model's own.
    chat_template: str | None = None
    # CUDA only: run every step eagerly instead of replaying captured CUDA graphs for decode batches.
    enforce_eager: bool = False
    # How embedding requests pool the prompt's final hidden states: "LAST" (the last token's, as decoder
    # embedding models are trained) or "MEAN" (the average over every prompt token); vLLM's pooling_type.
    pooling_type: str = "LAST"
    # Kernels whose reduction order does not depend on the batch (vLLM's VLLM_BATCH_INVARIANT): greedy and
    # seeded outputs are then identical whatever the batch mates, at a cost in throughput. CPU only.
    batch_invariant: bool = False
    # How weights are stored and run (vLLM's --quantization): None takes the checkpoint's own format (GGUF files run
    # kept quantized); "int8" / "int4" quantize a full-precision checkpoint at load; awq, gptq, fp8, gguf ... must
    # match the checkpoint.
    quantization: str | None = None

    def validate(self) -> None:
        if str(self.dtype).lower() not in DTYPE_ALIASES:
            raise ValueError(
                f"dtype={self.dtype!r} is not supported: use one of 'auto', 'bfloat16', 'float16', 'float32'"
            )
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is not supported: use 'auto', 'cpu' or 'cuda'")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be True or False, got {self.enforce_eager!r}")
        from tokenmill.pooling_params import check_pooling_type

        check_pooling_type(self.pooling_type)
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant must be True or False, got {self.batch_invariant!r}")
        if self.quantization is not None:
            from tokenmill.model.quantization import get_quantization_config_class

            get_quantization_config_class(str(self.quantization).lower())


@dataclass(frozen=True)
class CacheConfig:
    # Tokens per KV cache block.
    block_size: int = 16
    # Bytes for the KV cache (int or "2GiB"); None: a CPU default, or on CUDA what gpu_memory_utilization leaves.
    kv_cache_memory: int | str | None = None
    # Fraction of GPU memory the engine may use (CUDA only).
    gpu_memory_utilization: float = 0.9
    # Reuse KV blocks of identical prompt prefixes across requests.
    enable_prefix_caching: bool = True
    # Exactly this many KV blocks per rank, whatever the memory budget (vLLM's num_gpu_blocks_override: tests
    # and experiments that need a given cache size, e.g. to force preemption).
    num_gpu_blocks_override: int | None = None

    def validate(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two from 1 to 128, got {self.block_size!r}")
        if self.kv_cache_memory is not None:
            parse_size(self.kv_cache_memory, "kv_cache_memory")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        override = self.num_gpu_blocks_override
        if override is not None and (isinstance(override, bool) or not isinstance(override, int) or override < 1):
            raise ValueError(f"num_gpu_blocks_override must be a positive integer, got {override!r}")

    @property
    def kv_cache_bytes(self) -> int | None:
        return None if self.kv_cache_memory is None else parse_size(self.kv_cache_memory, "kv_cache_memory")


def default_cpu_kv_cache_bytes() -> int:
    """CPU default: 4 GiB, or a quarter of the machine's memory if that is less."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 * 2**30
    return min(4 * 2**30, total // 4)


@dataclass(frozen=True)
class SchedulerConfig:
    # Most requests in one batch.
    max_num_seqs: int = 256
    # Most tokens (prefill chunks + decodes) computed in one engine step; None: 2048 on CPU, 8192 on CUDA.
    max_num_batched_tokens: int | None = None
    # Schedule and launch step N+1 before step N's sampled tokens reach the host, and process step N's outputs
    # while N+1 runs (vLLM's --async-scheduling): the host work of a step hides behind the GPU's.
    async_scheduling: bool = False

    def validate(self) -> None:
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}")
        if self.max_num_batched_tokens is not None and (
            not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1
        ):
            raise ValueError(
                f"max_num_batched_tokens must be a positive integer, got {self.max_num_batched_tokens!r}"
            )
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True or False, got {self.async_scheduling!r}")


@dataclass(frozen=True)
class StructuredOutputsConfig:
    # The grammar library for requests that do not name one: "auto" (xgrammar, llguidance where xgrammar
    # cannot enforce the specification), "xgrammar" or "guidance" (vLLM's --structured-outputs-backend).
    backend: str = "auto"
    # Seconds a request's grammar may take to compile; past it that request alone fails (a 400 at the server).
    compile_timeout_s: float = 10.0

    def validate(self) -> None:
        if self.backend not in ("auto", "xgrammar", "guidance"):
            raise ValueError(
                f"structured_outputs_backend must be auto, xgrammar or guidance, got {self.backend!r}"
            )
        if isinstance(self.compile_timeout_s, bool) or not isinstance(self.compile_timeout_s, int | float) or not (
            self.compile_timeout_s > 0
        ):
            raise ValueError(
                f"structured_outputs_compile_timeout must be a number of seconds > 0, got {self.compile_timeout_s!r}"
            )


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    # Tensor-parallel degree: the model's heads, MLP and vocabulary split over this many ranks (one process per
    # device), with an all-reduce after each row-parallel projection (vLLM's --tensor-parallel-size).
    tensor_parallel_size: int = 1
    # Pipeline-parallel degree: the decoder layers split into this many stages, one rank (or tensor-parallel
    # group) each, activations sent from stage to stage (vLLM's --pipeline-parallel-size); at most the model's
    # number of layers.
    pipeline_parallel_size: int = 1
    # Where the workers (model, KV cache, runner) run: "uni" in the engine's process (one rank only), "mp" in
    # child processes, one per rank, reached through the serialized step contract, "ray" in Ray actors placed on
    # the nodes of a Ray cluster (vLLM's --distributed-executor-backend); None: "uni" for one rank, "mp" for more
    # (resolve_defaults).
    distributed_executor_backend: str | None = None

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs) -> EngineConfig:
        """The config from vLLM-named keyword arguments (those of LLM(...) and the serve flags: EngineArgs'
        fields), validated. batch_invariant=None reads TOKENMILL_BATCH_INVARIANT."""
        from tokenmill.engine.arg_utils import EngineArgs

        return EngineArgs.from_kwargs(model, **kwargs).create_engine_config()

    def validate(self) -> None:
        self.model.validate()
        self.cache.validate()
        self.scheduler.validate()
        self.structured_outputs.validate()
        backend = self.distributed_executor_backend
        if backend not in (None, "uni", "mp", "ray"):
            raise ValueError(f"distributed_executor_backend must be 'uni', 'mp' or 'ray', got {backend!r}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if backend == "uni" and self.world_size > 1:
            raise ValueError(
                f"distributed_executor_backend='uni' runs one rank in the engine's process, but "
                f"tensor_parallel_size * pipeline_parallel_size = {self.world_size}: use "
                "distributed_executor_backend='mp' (the default for more than one rank)"
            )

    @property
    def world_size(self) -> int:
        """Worker processes (ranks): tensor_parallel_size * pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


def resolve_defaults(config: EngineConfig) -> EngineConfig:
    """The config with every default that needs no measurement settled: device "auto" (cuda when available,
    else cpu), dtype "auto" and its aliases (bf16 where the hardware runs it fast: a CUDA GPU that supports it,
    else float16; a CPU with AVX512-BF16 or AMX, else float32), max_num_batched_tokens (8192 on CUDA, 2048 on
    CPU) and the CPU KV cache budget (default_cpu_kv_cache_bytes). The one place these defaults live:
    EngineArgs.create_engine_config() calls it, and EngineCore calls it on the config it is given (tests build
    EngineConfig directly). Idempotent: a resolved config comes back equal. The GPU KV cache size is not a
    default but a measurement (a profiled forward): the worker makes it when kv_cache_memory is None on CUDA.
    """
    import dataclasses

    config.validate()
    model, cache, scheduler = config.model, config.cache, config.scheduler
    device = model.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPE_ALIASES[str(model.dtype).lower()]
    if dtype == "auto":
        if device == "cuda":
            import torch

            dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "bfloat16" if cpu_supports_bf16() else "float32"
    max_num_batched_tokens = scheduler.max_num_batched_tokens
    if max_num_batched_tokens is None:
        max_num_batched_tokens = 8192 if device == "cuda" else 2048
    kv_cache_memory = cache.kv_cache_memory
    if kv_cache_memory is None and device == "cpu":
        kv_cache_memory = default_cpu_kv_cache_bytes()
    backend = config.distributed_executor_backend
    if backend is None:
        backend = "uni" if config.world_size == 1 else "mp"
    return dataclasses.replace(
        config, distributed_executor_backend=backend,
        model=dataclasses.replace(model, device=device, dtype=dtype),
        cache=dataclasses.replace(cache, kv_cache_memory=kv_cache_memory),
        scheduler=dataclasses.replace(scheduler, max_num_batched_tokens=max_num_batched_tokens),
    )


def unresolved_defaults(config: EngineConfig) -> list[str]:
    """The fields resolve_defaults() would still change: empty for a resolved config."""
    unresolved = []
    if config.model.device not in ("cpu", "cuda"):
        unresolved.append(f"device={config.model.device!r}")
    if config.model.dtype not in ("bfloat16", "float16", "float32"):
        unresolved.append(f"dtype={config.model.dtype!r}")
    if config.scheduler.max_num_batched_tokens is None:
        unresolved.append("max_num_batched_tokens=None")
    if config.cache.kv_cache_memory is None and config.model.device == "cpu":
        unresolved.append("kv_cache_memory=None on cpu")
    if config.distributed_executor_backend is None:
        unresolved.append("distributed_executor_backend=None")
    return unresolved
