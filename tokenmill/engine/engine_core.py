"""EngineCore: owns the model, the KV cache and the scheduler; one step = schedule -> launch -> collect."""

from __future__ import annotations

import atexit
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.config import DTYPE_ALIASES, EngineConfig, cpu_supports_bf16, default_cpu_kv_cache_bytes
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.scheduler import Scheduler
from tokenmill.model.loader import load_model, read_hf_config
from tokenmill.model.registry import DecoderSpec
from tokenmill.outputs import EngineCoreOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sample.sampler import Sampler
from tokenmill.structured_output.params import StructuredOutputError
from tokenmill.structured_output.request_state import StructuredOutputRequest
from tokenmill.worker.cpu_threads import check_cpu_threads
from tokenmill.worker.model_runner import LaunchedStep, ModelRunner

if TYPE_CHECKING:
    from tokenmill.model.tokenizer import Tokenizer
    from tokenmill.structured_output.manager import StructuredOutputManager
    from tokenmill.worker.gpu_memory import MemoryProfile

logger = logging.getLogger("tokenmill")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available: use device='cpu'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    name = DTYPE_ALIASES[str(name).lower()]
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def make_attention_backend(spec: DecoderSpec, device: torch.device, dtype: torch.dtype,
                           batch_invariant: bool = False) -> AttentionBackend:
    args = (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.head_dim**-0.5, spec.sliding_window)
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


def size_kv_cache(config: EngineConfig, hf_config: dict, dtype: torch.dtype, device: torch.device) -> KVCacheSizing:
    from tokenmill.planner import ModelArch, kv_cache_bytes_per_block

    arch = ModelArch.from_hf_config(hf_config)
    block_size = config.cache.block_size
    bytes_per_block = kv_cache_bytes_per_block(arch, block_size, dtype)
    budget = config.cache.kv_cache_bytes
    if budget is None:
        budget = default_cpu_kv_cache_bytes()
    num_blocks = budget // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory={budget} bytes holds no KV block ({bytes_per_block} bytes per block of "
            f"{block_size} tokens): raise kv_cache_memory"
        )
    return KVCacheSizing(bytes_per_block, num_blocks, block_size)


class EngineCore:
    def __init__(self, config: EngineConfig, model_dir: Path, show_progress: bool = True,
                 tokenizer: Tokenizer | None = None) -> None:
        config.validate()
        self.config = config
        self.model_dir = Path(model_dir)
        # For grammars (structured outputs); loaded from model_dir on first need when not given.
        self._tokenizer = tokenizer
        self._structured_outputs: StructuredOutputManager | None = None
        # request_id -> Request whose grammar is still compiling (it waits; the others run).
        self._compiling: dict[str, Request] = {}
        self.device = resolve_device(config.model.device)
        if self.device.type == "cpu":
            check_cpu_threads()
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        hf_config = read_hf_config(model_dir)
        self.spec = DecoderSpec.from_hf_config(hf_config, source=str(Path(model_dir) / "config.json"))
        if config.model.max_model_len is not None and config.model.max_model_len > self.spec.max_position_embeddings:
            raise ValueError(
                f"max_model_len={config.model.max_model_len} exceeds the model's limit of "
                f"{self.spec.max_position_embeddings} tokens (max_position_embeddings): lower max_model_len"
            )
        sched = config.scheduler
        default_tokens = 8192 if self.device.type == "cuda" else 2048
        self.max_num_batched_tokens = sched.max_num_batched_tokens or default_tokens
        block_size = config.cache.block_size

        backend = make_attention_backend(self.spec, self.device, self.dtype, config.model.batch_invariant)
        max_positions = config.model.max_model_len or self.spec.max_position_embeddings
        self.model = load_model(model_dir, backend, self.dtype, self.device, max_positions, show_progress,
                                config.model.quantization)
        if config.model.batch_invariant:
            from tokenmill.worker.batch_invariant import tile_linear_rows

            tile_linear_rows(self.model)
            logger.info("batch-invariant mode: linear layers in tiles of fixed rows, attention per token")
        self.memory_profile: MemoryProfile | None = None
        if self.device.type == "cuda" and config.cache.kv_cache_bytes is None:
            self.kv_sizing = self._profile_gpu_kv_cache(hf_config)
        else:
            self.kv_sizing = size_kv_cache(config, hf_config, self.dtype, self.device)
        self.max_model_len = self._resolve_max_model_len()

        shape = (2, self.kv_sizing.num_blocks, block_size, self.spec.num_kv_heads, self.spec.head_dim)
        self.kv_caches = [allocate_zeroed(shape, self.dtype, self.device) for _ in range(self.spec.num_layers)]
        self.kv_cache_manager = KVCacheManager(
            self.kv_sizing.num_blocks, block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.kv_cache_manager, sched.max_num_seqs, self.max_num_batched_tokens,
                                   self.max_model_len)
        self.graph_runner = None
        self.graph_capture_seconds: float | None = None
        if self.device.type == "cuda" and not config.model.enforce_eager and backend.name == "triton":
            from tokenmill.worker.cuda_graphs import CUDAGraphRunner

            self.graph_runner = CUDAGraphRunner(self.model, self.kv_caches, sched.max_num_seqs, self.max_model_len,
                                                block_size, self.device)
            self.graph_capture_seconds = self.graph_runner.capture()
            logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s",
                        self.graph_runner.sizes, self.graph_capture_seconds)
        generator = torch.Generator().manual_seed(config.model.seed)
        self.runner = ModelRunner(self.model, self.kv_caches, self.kv_cache_manager, Sampler(generator), self.device,
                                  graph_runner=self.graph_runner)
        self.async_scheduling = sched.async_scheduling
        # Async scheduling: the launched step whose samples have not been collected yet.
        self._in_flight: LaunchedStep | None = None
        self._last_collect_end = 0.0
        # Seconds spent inside steps that computed tokens, and the tokens they sampled.
        self.busy_seconds = 0.0
        self.num_generated_tokens = 0
        self.num_steps = 0
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s); max_model_len %d; "
            "max concurrency at max_model_len %.1f",
            self.kv_sizing.num_blocks, block_size, self.kv_sizing.num_tokens,
            self.kv_sizing.num_blocks * self.kv_sizing.bytes_per_block / 2**20, self.dtype,
            self.max_model_len, self.kv_sizing.num_tokens / self.max_model_len,
        )
        freeze_gc_heap()

    def _profile_gpu_kv_cache(self, hf_config: dict) -> KVCacheSizing:
        """Blocks from what one profiled forward at max_num_batched_tokens leaves of the GPU's memory."""
        from tokenmill.planner import ModelArch, kv_cache_bytes_per_block
        from tokenmill.worker.gpu_memory import profile_kv_cache

        block_size = self.config.cache.block_size
        bytes_per_block = kv_cache_bytes_per_block(ModelArch.from_hf_config(hf_config), block_size, self.dtype)
        spec = self.spec
        profile = self.memory_profile = profile_kv_cache(
            self.model, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, num_layers=spec.num_layers,
            dtype=self.dtype, device=self.device, block_size=block_size, bytes_per_block=bytes_per_block,
            max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.config.scheduler.max_num_seqs,
            gpu_memory_utilization=self.config.cache.gpu_memory_utilization, hf_config=hf_config,
            enforce_eager=self.config.model.enforce_eager,
        )
        if profile.num_blocks < 1:
            raise ValueError(
                "no GPU memory is left for the KV cache after weights and activations: raise "
                "--gpu-memory-utilization, lower --max-num-batched-tokens, or use a smaller model"
            )
        return KVCacheSizing(bytes_per_block, profile.num_blocks, block_size)

    def _resolve_max_model_len(self) -> int:
        model_limit = self.spec.max_position_embeddings
        capacity = self.kv_sizing.num_tokens
        wanted = self.config.model.max_model_len
        if wanted is None:
            return min(model_limit, capacity)
        if wanted > capacity:
            raise ValueError(
                f"max_model_len={wanted} does not fit in the KV cache, which holds {capacity} tokens: "
                f"raise kv_cache_memory or lower max_model_len to {capacity}"
            )
        return wanted

    # ---- requests -----------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        spec = request.sampling_params.structured_outputs
        if spec is not None:
            # Never blocks: the compile runs on a thread; the request waits until its grammar is ready.
            pending = self.structured_outputs.submit(spec)
            request.structured_output = StructuredOutputRequest(pending)
        self.scheduler.add_request(request)
        if request.structured_output is not None:
            self._compiling[request.request_id] = request

    @property
    def structured_outputs(self) -> StructuredOutputManager:
        """The grammar compiler and cache, built on first use (engines that never see a constrained request
        do not load the grammar libraries)."""
        if self._structured_outputs is None:
            from tokenmill.model.tokenizer import Tokenizer
            from tokenmill.structured_output.manager import StructuredOutputManager

            if self._tokenizer is None:
                self._tokenizer = Tokenizer.from_pretrained(self.model_dir)
            so = self.config.structured_outputs
            self._structured_outputs = StructuredOutputManager(
                self._tokenizer, vocab_size=self.spec.vocab_size, backend=so.backend,
                compile_timeout_s=so.compile_timeout_s,
            )
        return self._structured_outputs

    def _poll_grammars(self) -> list[EngineCoreOutput]:
        """Admit requests whose grammar is ready; fail alone those whose compile failed or timed out."""
        outputs = []
        for request_id, request in list(self._compiling.items()):
            state = request.structured_output
            assert state is not None
            try:
                ready = state.poll()
            except StructuredOutputError as e:
                del self._compiling[request_id]
                request.error = e
                self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
                outputs.append(EngineCoreOutput(request_id, [], None, None, RequestStatus.FINISHED_ABORTED.finish_reason,
                                                None, error=e))
                continue
            if ready or request.is_finished:
                del self._compiling[request_id]
        return outputs

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        for request_id in request_ids:
            self._compiling.pop(request_id, None)
        self.scheduler.finish_requests(request_ids, status)
        self._collect_if_idle()

    def _collect_if_idle(self) -> None:
        """With no unfinished request left, nothing would step again to collect the step in flight (only
        finished requests' extra tokens): collect it now, so that idle time is never charged to it."""
        if self._in_flight is not None and not self.scheduler.has_unfinished_requests():
            in_flight, self._in_flight = self._in_flight, None
            self._collect(in_flight)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def set_async_scheduling(self, enabled: bool) -> None:
        """Switch async scheduling on or off between requests (benchmarks compare both on one engine)."""
        if self.has_unfinished_requests() or self._in_flight is not None:
            raise RuntimeError("async scheduling can only be switched while no request is in flight")
        self.async_scheduling = bool(enabled)

    # ---- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """One engine step: the outputs of the tokens sampled by it, or with async scheduling by the step
        before it (this one is launched and left running)."""
        failed = self._poll_grammars() if self._compiling else []
        if self.async_scheduling:
            outputs = failed + self._step_async()
        else:
            sched = self.scheduler.schedule()
            outputs = failed + ([] if sched.is_empty else self._collect(self._launch(sched)))
        if not outputs and self._compiling and self._in_flight is None:
            time.sleep(0.001)  # every request left waits for its grammar: do not spin
        return outputs

    def _launch(self, sched, prev: LaunchedStep | None = None) -> LaunchedStep:
        step = self.runner.launch(sched, prev)
        self.scheduler.on_launched(sched)
        self.num_steps += 1
        return step

    def _step_async(self) -> list[EngineCoreOutput]:
        """Schedule and launch step N+1, then collect step N while N+1 runs on the device.

        Step N+1 reads the tokens sampled by N on the device. Requests whose sampler needs their output
        tokens on the host (penalties, min_tokens, a grammar matcher) make the engine collect N before
        scheduling N+1.
        """
        outputs: list[EngineCoreOutput] = []
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None and in_flight.needs_sync:
            outputs = self._collect(in_flight)
            in_flight = None
        sched = self.scheduler.schedule()
        if not sched.is_empty:
            self._in_flight = self._launch(sched, prev=in_flight)
        if in_flight is not None:
            outputs += self._collect(in_flight)
        self._collect_if_idle()
        return outputs

    def _collect(self, step: LaunchedStep) -> list[EngineCoreOutput]:
        runner_out = self.runner.collect(step)
        end = time.perf_counter()
        # Async steps overlap: each is charged from its launch, or the previous collection if later, to its
        # collection (a synchronous step: from its launch).
        elapsed = end - max(step.start, self._last_collect_end)
        self._last_collect_end = end
        self.busy_seconds += elapsed
        self.num_generated_tokens += len(runner_out.sampled)
        return self.scheduler.update_from_output(step.sched, runner_out, elapsed)
