"""The Worker: everything that touches the device. It resolves device and dtype, picks the attention backend,
loads the model, measures what memory the KV cache may take (profiling on a GPU), allocates the KV cache
tensors, captures CUDA graphs and owns the ModelRunner.

Start-up flows one way: config -> Worker(...) (device, model) -> determine_kv_cache_sizing() (blocks that
fit) -> the engine settles max_model_len -> initialize_cache(num_blocks, max_model_len) (tensors, graphs,
runner) -> the engine builds its KV cache manager and scheduler. After that the worker runs steps:
launch(SchedulerOutput) and collect() -> ModelRunnerOutput, both plain data (tokenmill/outputs.py), so the
worker can live in another process (executor.py).
"""

from __future__ import annotations

import atexit
import gc
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.config import EngineConfig, emulated_dtype_warning, unresolved_defaults
from tokenmill.distributed import ParallelConfig, init_distributed, set_collective_timing
from tokenmill.model.loader import load_model, read_hf_config
from tokenmill.model.registry import DecoderSpec
from tokenmill.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.sample.sampler import Sampler
from tokenmill.worker.cpu_threads import check_cpu_threads, usable_cpus
from tokenmill.worker.model_runner import GrammarFactory, LaunchedStep, ModelRunner

if TYPE_CHECKING:
    from tokenmill.worker.cuda_graphs import CUDAGraphRunner
    from tokenmill.worker.gpu_memory import MemoryProfile

logger = logging.getLogger("tokenmill")


def open_device(name: str) -> torch.device:
    """The resolved device ("cpu" or "cuda"), checked to be there."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available: use device='cpu'")
    return torch.device(name)


def make_attention_backend(spec: DecoderSpec, device: torch.device, dtype: torch.dtype,
                           batch_invariant: bool = False, tensor_parallel_size: int = 1) -> AttentionBackend:
    """The attention backend for one rank's heads (num_heads / tp query heads, its share of the KV heads)."""
    args = (spec.num_heads // tensor_parallel_size, num_kv_heads_per_rank(spec, tensor_parallel_size),
            spec.head_dim, spec.head_dim**-0.5, spec.sliding_window)
    if batch_invariant:
        from tokenmill.kernels.cpu import ops as cpu_kernels

        if device.type != "cpu":
            raise ValueError("batch_invariant=True is implemented for the CPU only: use device='cpu' or drop "
                             "batch_invariant (--batch-invariant)")
        if not cpu_kernels.supports(dtype):
            raise ValueError(f"batch_invariant=True needs the native CPU kernels for {dtype}, which are not "
                             "available here (see the log for why): drop batch_invariant")
        from tokenmill.attention.cpu_backend import CPUAttentionBackend

        return CPUAttentionBackend(*args, batch_invariant=True)
    if device.type == "cuda":
        try:
            from tokenmill.attention.triton_backend import TritonAttentionBackend
        except ImportError as e:  # Triton missing: the reference backend still runs on CUDA
            logger.warning("Triton attention unavailable (%s); using the PyTorch backend", e)
        else:
            return TritonAttentionBackend(*args)
        return TorchAttentionBackend(*args)
    from tokenmill.kernels.cpu import ops as cpu_kernels

    if cpu_kernels.supports(dtype):
        from tokenmill.attention.cpu_backend import CPUAttentionBackend

        return CPUAttentionBackend(*args)
    return TorchAttentionBackend(*args)


def num_kv_heads_per_rank(spec: DecoderSpec, tensor_parallel_size: int) -> int:
    """KV heads one tensor-parallel rank holds: num_kv_heads / tp, or 1 (a replicated head) when tp exceeds them,
    as the planner models it (tokenmill.planner.num_kv_heads_per_rank)."""
    return max(1, spec.num_kv_heads // tensor_parallel_size)


def check_tensor_parallel_size(hf_config: dict, tensor_parallel_size: int, source: str = "config.json",
                               quantization: str | None = None) -> None:
    """ValueError unless the model splits over tensor_parallel_size ranks: the planner's rule on the heads
    (divide the query heads; divide the KV heads or be a multiple of them), listing the valid sizes, the MLP's
    intermediate size, and the weights' format (a quantization method that can be split, in whole blocks)."""
    from tokenmill.model.layers.linear import TensorParallelShard, check_tensor_parallel_split
    from tokenmill.model.quantization import resolve_quantization
    from tokenmill.planner import ModelArch
    from tokenmill.planner.memory import check_tensor_parallel_size as check_heads
    from tokenmill.planner.memory import valid_tensor_parallel_sizes

    tp = tensor_parallel_size
    arch = ModelArch.from_hf_config(hf_config)
    check_heads(arch, tp)
    inter = int(hf_config.get("intermediate_size", 0))
    if inter % tp:
        valid = [t for t in valid_tensor_parallel_sizes(arch, max(8, tp)) if inter % t == 0]
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide {source}'s intermediate_size={inter}: use "
            f"one of {', '.join(map(str, valid))}"
        )
    quant_config = resolve_quantization(hf_config, quantization, source)
    if quant_config is None or tp == 1:
        return
    spec = DecoderSpec.from_hf_config(hf_config, source=source)
    q_size = spec.num_heads * spec.head_dim
    layers: list[tuple[str, list[str], str, int]] = [  # (layer, checkpoint parts, kind, checkpoint inputs)
        ("model.embed_tokens", ["model.embed_tokens"], "column", spec.hidden_size),
        ("lm_head", ["lm_head"], "column", spec.hidden_size),
    ]
    for i in range(spec.num_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        layers += [
            (f"{attn}.qkv_proj", [f"{attn}.{p}_proj" for p in "qkv"], "column", spec.hidden_size),
            (f"{attn}.o_proj", [f"{attn}.o_proj"], "row", q_size),
            (f"{mlp}.gate_up_proj", [f"{mlp}.gate_proj", f"{mlp}.up_proj"], "column", spec.hidden_size),
            (f"{mlp}.down_proj", [f"{mlp}.down_proj"], "row", spec.intermediate_size),
        ]
    for prefix, parts, kind, full in layers:
        local = full // tp if kind == "row" else full
        shard = TensorParallelShard(kind, ((0, local),), tp, full)
        check_tensor_parallel_split(quant_config.get_linear_method(prefix, parts), shard, local, prefix)


def check_pipeline_parallel_size(hf_config: dict, pipeline_parallel_size: int, source: str = "config.json") -> None:
    """ValueError unless every pipeline stage gets at least one decoder layer (the range of valid sizes named)."""
    num_layers = hf_config.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        return  # DecoderSpec reports a config without layers
    if pipeline_parallel_size > num_layers:
        raise ValueError(
            f"pipeline_parallel_size={pipeline_parallel_size} exceeds the {num_layers} decoder layers of {source} "
            f"(num_hidden_layers): every stage needs at least one layer, use 1 to {num_layers}"
        )


def allocate_zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed, not empty: padded decode attention reads unused slots (masked, but NaN * 0 would still leak).

    On CPU the memory comes from calloc through numpy, so untouched pages cost neither time nor RSS: a
    4 GiB cache starts at once and grows into memory as blocks are used.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(shape[:-1] + (shape[-1] * itemsize,), dtype=np.uint8)
    _advise_huge_pages(raw)
    return torch.from_numpy(raw).view(dtype)


def _advise_huge_pages(array: np.ndarray) -> None:
    """Ask Linux for transparent huge pages: attention reads blocks scattered over the whole cache, and 2 MiB
    pages keep those reads from missing the TLB. Best effort; nothing changes where it is not supported."""
    try:
        import ctypes
        import mmap

        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        start = array.ctypes.data
        aligned = (start + page - 1) // page * page
        length = (start + array.nbytes - aligned) // page * page
        if length > 0:
            libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(length), 14)  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        pass


def freeze_gc_heap() -> None:
    """Move everything alive after start-up (the block pool's objects, the model's modules) out of the cyclic
    garbage collector's reach. With hundreds of thousands of KV blocks a full collection takes 0.1-1 s, and
    one runs every so often in the middle of an engine step; frozen objects are never traversed again. They
    are still freed as usual when their last reference goes; at exit they are handed back to the collector,
    so that extension modules see their objects released."""
    global _gc_unfreeze_registered
    gc.collect()
    gc.freeze()
    if not _gc_unfreeze_registered:
        atexit.register(gc.unfreeze)
        _gc_unfreeze_registered = True


_gc_unfreeze_registered = False


@dataclass
class KVCacheSizing:
    bytes_per_block: int
    num_blocks: int
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def kv_cache_bytes_per_block_of_rank(hf_config: dict, block_size: int, dtype: torch.dtype,
                                     tensor_parallel_size: int = 1, num_layers: int | None = None) -> int:
    """Bytes one KV block costs on one rank: the planner's bytes per token and layer of its share of the KV
    heads, times the layers it holds (num_layers: its pipeline stage's; default all), times block_size."""
    from tokenmill.planner import ModelArch
    from tokenmill.planner.memory import kv_cache_bytes_per_token_per_layer

    arch = ModelArch.from_hf_config(hf_config)
    layers = arch.num_layers if num_layers is None else num_layers
    return block_size * layers * kv_cache_bytes_per_token_per_layer(arch, dtype, tensor_parallel_size)


def size_kv_cache(config: EngineConfig, hf_config: dict, dtype: torch.dtype, device: torch.device,
                  num_layers: int | None = None) -> KVCacheSizing:
    """Blocks of one rank's KV cache: its kv_cache_memory budget over the bytes per block of one rank (its share
    of the KV heads, its pipeline stage's num_layers), or num_gpu_blocks_override."""
    block_size = config.cache.block_size
    bytes_per_block = kv_cache_bytes_per_block_of_rank(hf_config, block_size, dtype, config.tensor_parallel_size,
                                                       num_layers)
    if config.cache.num_gpu_blocks_override is not None:
        return KVCacheSizing(bytes_per_block, config.cache.num_gpu_blocks_override, block_size)
    budget = config.cache.kv_cache_bytes
    if budget is None:
        raise ValueError("kv_cache_memory is None: a CPU budget is a default (config.resolve_defaults), a GPU's "
                         "is measured (Worker.determine_kv_cache_sizing)")
    num_blocks = budget // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory={budget} bytes holds no KV block ({bytes_per_block} bytes per block of "
            f"{block_size} tokens): raise kv_cache_memory"
        )
    return KVCacheSizing(bytes_per_block, num_blocks, block_size)


def weight_bytes_read_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every weight as allocated (quantized layers' packed tensors
    included, a tied embedding once), except an untied embedding table, of which only the batch's rows are read."""
    from tokenmill.model.layers.linear import resident_tensors, tensor_bytes

    allocated = getattr(model, "weight_bytes", None)
    if not callable(allocated):
        return sum(p.numel() * p.element_size() for p in model.parameters())
    total = int(allocated())
    spec = getattr(model, "spec", None)
    embed = getattr(model, "embed_tokens", None)
    if spec is not None and embed is not None and not spec.tie_word_embeddings:
        total -= sum(dict(tensor_bytes(t) for t in resident_tensors(embed) if t.device.type != "meta").values())
    return total


class Worker:
    """One device's model, KV cache and runner: one rank of the world (tensor_parallel_size *
    pipeline_parallel_size ranks), or the only one.

    It takes a config whose defaults are resolved (config.resolve_defaults: the engine core resolves the config
    it is given): no "auto" and no None is left for it to decide, except the KV cache size on a GPU, which it
    measures. Its place in the world comes as arguments (rank, local_rank: the device index on its node, and the
    rendezvous distributed_init_method "tcp://host:port"), whatever started it: the multiprocessing executor, or
    a Ray actor. It joins the process groups before it builds its share of the model. num_cpu_threads (CPU): the
    torch threads its starter gives it (a Ray actor: its bundle's CPUs); None shares this machine's usable CPUs
    evenly among the ranks."""

    def __init__(self, config: EngineConfig, model_dir: Path, show_progress: bool = True,
                 grammar_factory: GrammarFactory | None = None, rank: int = 0, local_rank: int = 0,
                 distributed_init_method: str | None = None, num_cpu_threads: int | None = None) -> None:
        unresolved = unresolved_defaults(config)
        if unresolved:
            raise ValueError(f"the worker got a config with unresolved defaults ({', '.join(unresolved)}): pass "
                             "it through tokenmill.config.resolve_defaults() first")
        self.config = config
        self.model_dir = Path(model_dir)
        self.grammar_factory = grammar_factory
        self.parallel_config = ParallelConfig(
            world_size=config.world_size, rank=rank, local_rank=local_rank,
            tensor_parallel_size=config.tensor_parallel_size, pipeline_parallel_size=config.pipeline_parallel_size,
            distributed_init_method=distributed_init_method,
        )
        self.rank = rank
        self.device = open_device(config.model.device)
        if self.device.type == "cuda" and config.world_size > 1:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"rank {rank} needs GPU {local_rank} but {torch.cuda.device_count()} are visible: "
                                 "lower tensor_parallel_size to the GPUs of the machine")
            self.device = torch.device("cuda", local_rank)
        if self.device.type == "cpu":
            check_cpu_threads()
            if num_cpu_threads is not None:
                torch.set_num_threads(num_cpu_threads)
                logger.info("rank %d: %d CPU threads", rank, num_cpu_threads)
            elif config.world_size > 1:
                # N ranks on one CPU: each takes its share of the cores, or their OpenMP pools oversubscribe it.
                threads = max(1, usable_cpus() // config.world_size)
                torch.set_num_threads(threads)
                logger.info("rank %d: %d CPU threads (%d usable CPUs shared by %d ranks)", rank, threads,
                            usable_cpus(), config.world_size)
        self.dtype: torch.dtype = getattr(torch, config.model.dtype)
        if rank == 0 and (warning := emulated_dtype_warning(self.device.type, config.model.dtype)):
            logger.warning(warning)
        self.hf_config = read_hf_config(model_dir)
        self.tensor_parallel_size = config.tensor_parallel_size
        if self.tensor_parallel_size > 1:
            check_tensor_parallel_size(self.hf_config, self.tensor_parallel_size, str(Path(model_dir) / "config.json"),
                                       config.model.quantization)
        if config.pipeline_parallel_size > 1:
            check_pipeline_parallel_size(self.hf_config, config.pipeline_parallel_size,
                                         str(Path(model_dir) / "config.json"))
        init_distributed(self.parallel_config, self.device)
        self.spec = DecoderSpec.from_hf_config(self.hf_config, source=str(Path(model_dir) / "config.json"))
        if config.model.max_model_len is not None and config.model.max_model_len > self.spec.max_position_embeddings:
            raise ValueError(
                f"max_model_len={config.model.max_model_len} exceeds the model's limit of "
                f"{self.spec.max_position_embeddings} tokens (max_position_embeddings): lower max_model_len"
            )
        max_num_batched_tokens = config.scheduler.max_num_batched_tokens
        assert max_num_batched_tokens is not None  # unresolved_defaults() checked it
        self.max_num_batched_tokens = max_num_batched_tokens
        self.backend = make_attention_backend(self.spec, self.device, self.dtype, config.model.batch_invariant,
                                              self.tensor_parallel_size)
        self.num_kv_heads = num_kv_heads_per_rank(self.spec, self.tensor_parallel_size)  # this rank's
        max_positions = config.model.max_model_len or self.spec.max_position_embeddings
        self.model = load_model(model_dir, self.backend, self.dtype, self.device, max_positions, show_progress,
                                config.model.quantization)
        # This rank's pipeline stage: its decoder layers (planner.pipeline_stage_layers), one KV tensor each.
        self.stage_layers = (self.model.start_layer, self.model.end_layer)
        self.num_stage_layers = self.model.num_stage_layers
        if config.model.batch_invariant:
            from tokenmill.worker.batch_invariant import tile_linear_rows

            tile_linear_rows(self.model)
            logger.info("batch-invariant mode: linear layers in tiles of fixed rows, attention per token")
        self.memory_profile: MemoryProfile | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.graph_runner: CUDAGraphRunner | None = None
        self.graph_capture_seconds: float | None = None
        self._runner: ModelRunner | None = None
        # Launched steps not yet collected, oldest first (two at most: async scheduling).
        self._in_flight: deque[LaunchedStep] = deque()

    # ---- start-up -------------------------------------------------------------------------------------------
    def determine_kv_cache_sizing(self) -> KVCacheSizing:
        """How many KV blocks fit: from kv_cache_memory, else on a GPU from a profiled forward at
        max_num_batched_tokens and gpu_memory_utilization (a measurement, the one size not resolved beforehand)."""
        if self.device.type == "cuda" and self.config.cache.kv_cache_bytes is None:
            return self._profile_gpu_kv_cache()
        return size_kv_cache(self.config, self.hf_config, self.dtype, self.device, self.num_stage_layers)

    def _profile_gpu_kv_cache(self) -> KVCacheSizing:
        """Blocks from what one profiled forward at max_num_batched_tokens leaves of the GPU's memory."""
        from tokenmill.worker.gpu_memory import profile_kv_cache

        config = self.config
        block_size = config.cache.block_size
        bytes_per_block = kv_cache_bytes_per_block_of_rank(self.hf_config, block_size, self.dtype,
                                                           self.tensor_parallel_size, self.num_stage_layers)
        spec = self.spec
        profile = self.memory_profile = profile_kv_cache(
            self.model, num_kv_heads=self.num_kv_heads, head_dim=spec.head_dim, num_layers=self.num_stage_layers,
            dtype=self.dtype, device=self.device, block_size=block_size, bytes_per_block=bytes_per_block,
            max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=config.scheduler.max_num_seqs,
            gpu_memory_utilization=config.cache.gpu_memory_utilization, hf_config=self.hf_config,
            enforce_eager=config.model.enforce_eager,
        )
        if profile.num_blocks < 1:
            raise ValueError(
                "no GPU memory is left for the KV cache after weights and activations: raise "
                "--gpu-memory-utilization, lower --max-num-batched-tokens, or use a smaller model"
            )
        if config.cache.num_gpu_blocks_override is not None:
            return KVCacheSizing(bytes_per_block, config.cache.num_gpu_blocks_override, block_size)
        return KVCacheSizing(bytes_per_block, profile.num_blocks, block_size)

    def initialize_cache(self, num_blocks: int, max_model_len: int) -> None:
        """Allocate the KV cache tensors, capture CUDA graphs (CUDA with Triton attention, unless
        enforce_eager) and build the model runner."""
        config = self.config
        block_size = config.cache.block_size
        spec = self.spec
        shape = (2, num_blocks, block_size, self.num_kv_heads, spec.head_dim)
        # One tensor per layer of this pipeline stage.
        self.kv_caches = [allocate_zeroed(shape, self.dtype, self.device) for _ in range(self.num_stage_layers)]
        graphs = self.device.type == "cuda" and not config.model.enforce_eager and self.backend.name == "triton"
        if graphs and config.world_size > 1:
            # torch.distributed's collectives (and a pipeline stage's microbatch sends) are not captured into
            # CUDA graphs here: run every step eagerly.
            logger.info("rank %d: CUDA graphs are not captured with %d ranks; decode steps run eagerly",
                        self.rank, config.world_size)
            graphs = False
        if graphs:
            from tokenmill.worker.cuda_graphs import CUDAGraphRunner

            self.graph_runner = CUDAGraphRunner(self.model, self.kv_caches, config.scheduler.max_num_seqs,
                                                max_model_len, block_size, self.device)
            self.graph_capture_seconds = self.graph_runner.capture()
            logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s",
                        self.graph_runner.sizes, self.graph_capture_seconds)
        generator = torch.Generator().manual_seed(config.model.seed)
        self._runner = ModelRunner(self.model, self.kv_caches, block_size, Sampler(generator), self.device,
                                   graph_runner=self.graph_runner, grammar_factory=self.grammar_factory)

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise RuntimeError("the worker's KV cache is not initialized: call initialize_cache() first")
        return self._runner

    def engine_facts(self) -> dict:
        """What the device side settled, as plain data (EngineCore.engine_info): device, dtype, attention
        backend, weight bytes (as allocated: quantized layers' packed tensors included), KV cache tensor bytes,
        CUDA graph sizes and capture seconds, the GPU memory profile."""
        return {
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "attention_backend": self.backend.name,
            "weight_bytes": self.model.weight_bytes(),
            "kv_cache_bytes": sum(t.numel() * t.element_size() for t in self.kv_caches),
            "weight_bytes_read_per_step": weight_bytes_read_per_step(self.model),
            "cuda_graph_sizes": list(self.graph_runner.sizes) if self.graph_runner is not None else None,
            "graph_capture_seconds": self.graph_capture_seconds,
            "memory_profile": self.memory_profile.as_dict() if self.memory_profile is not None else None,
            # Where this worker sits: the weight and KV bytes above are this rank's share.
            "rank": self.rank, "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.config.pipeline_parallel_size,
            "pp_rank": self.parallel_config.pp_rank, "layers": list(self.stage_layers),
            # Seconds this stage computed (not waiting for another stage), since start-up; None with one stage.
            "pipeline_busy_seconds": self._runner.pipeline_busy_seconds
            if self._runner is not None and self.config.pipeline_parallel_size > 1 else None,
        }

    def set_step_timing(self, enabled: bool) -> None:
        """Time each step's runner stages into ModelRunnerOutput.stage_seconds (off by default: on CUDA it
        records two pairs of events per step)."""
        self.runner.step_timing = bool(enabled)
        if self.tensor_parallel_size > 1:
            set_collective_timing(enabled)  # the collectives' share of the step: stage_seconds["collectives"]

    # ---- steps ----------------------------------------------------------------------------------------------
    def launch(self, sched: SchedulerOutput) -> None:
        """Queue a step on the device; it reads the tokens of the step launched before it, if still in flight."""
        prev = self._in_flight[-1] if self._in_flight else None
        self._in_flight.append(self.runner.launch(sched, prev))

    def collect(self) -> ModelRunnerOutput:
        """Wait for the oldest launched step and return its output."""
        if not self._in_flight:
            raise RuntimeError("collect() without a launched step")
        return self.runner.collect(self._in_flight.popleft())

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """One synchronous step: launch and collect."""
        self.launch(sched)
        return self.collect()
