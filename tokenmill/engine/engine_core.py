"""EngineCore: the scheduler, the KV cache manager and the step loop; one step = schedule -> launch -> collect.

The device side (model, KV cache tensors, runner) is the worker's (tokenmill/worker/worker.py), reached
through an executor: in this process or in a child process (distributed_executor_backend "uni" / "mp").
The two sides exchange only plain data: SchedulerOutput in, ModelRunnerOutput out (tokenmill/outputs.py).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.config import EngineConfig, resolve_defaults
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.scheduler import Scheduler
from tokenmill.metrics.stats import SchedulerStats
from tokenmill.model.registry import DecoderSpec
from tokenmill.outputs import EngineCoreOutput, SchedulerOutput
from tokenmill.planner.engine_memory import log_rank_memory
from tokenmill.request import Request, RequestStatus
from tokenmill.structured_output.params import StructuredOutputError
from tokenmill.structured_output.request_state import StructuredOutputRequest
from tokenmill.worker.executor import Executor, UniProcExecutor, make_executor
from tokenmill.worker.worker import KVCacheSizing, Worker, freeze_gc_heap

if TYPE_CHECKING:
    from tokenmill.model.tokenizer import Tokenizer
    from tokenmill.structured_output.backend import GrammarMatcher
    from tokenmill.structured_output.manager import StructuredOutputManager
    from tokenmill.structured_output.params import StructuredOutputsParams
    from tokenmill.worker.gpu_memory import MemoryProfile
    from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger("tokenmill")


@dataclass
class InFlightStep:
    """A launched step the engine has not collected yet."""

    sched: SchedulerOutput
    start: float  # perf_counter() when the launch began
    # Whether a request it samples needs that token on the host before it is scheduled again.
    needs_sync: bool


@dataclass
class StepTiming:
    """One EngineCore.step() call split into its stages, in seconds (EngineCore.set_step_timing).

    With async scheduling a call launches one step and collects the one before it: the runner's stages are those
    of the step it collected. On CUDA forward, logits and sample are device time (CUDA events); on CPU everything
    is host time, and the runner's stages lie inside launch.
    """

    step: float = 0.0  # the whole call, wall time
    schedule: float = 0.0  # Scheduler.schedule
    launch: float = 0.0  # handing the step to the executor (in-process on CPU: the runner's whole step)
    collect: float = 0.0  # waiting for a step's output: device work the host did not hide, or the pipe
    update: float = 0.0  # Scheduler.update_from_output
    build_batch: float = 0.0  # runner: state updates and the flat batch (host)
    forward: float = 0.0  # runner: the model's forward
    logits: float = 0.0  # runner: the sampled rows' logits (the LM head)
    sample: float = 0.0  # runner: the sampler (logits processors, top-k/p, the draws)
    collectives: float = 0.0  # runner, tensor parallelism: the output rank's collectives (inside the above)
    num_scheduled_tokens: int = 0  # tokens of the step this call launched
    num_collected: int = 0  # steps this call collected (0 or 1)

    def add(self, stage: str, seconds: float) -> None:
        setattr(self, stage, getattr(self, stage) + seconds)


class EngineCore:
    def __init__(self, config: EngineConfig, model_dir: Path, show_progress: bool = True,
                 tokenizer: Tokenizer | None = None) -> None:
        # Every default settled once, here (a no-op for a config from EngineArgs.create_engine_config()).
        config = resolve_defaults(config)
        self.config = config
        self.model_dir = Path(model_dir)
        # For grammars (structured outputs); loaded from model_dir on first need when not given.
        self._tokenizer = tokenizer
        self._structured_outputs: StructuredOutputManager | None = None
        # request_id -> Request whose grammar is still compiling (it waits; the others run).
        self._compiling: dict[str, Request] = {}
        # Start-up, one direction: worker (device, model) -> KV sizing -> max_model_len -> KV tensors and
        # runner -> KV cache manager and scheduler.
        self.executor: Executor = make_executor(config, self.model_dir, show_progress, self._grammar_matcher)
        info = self.executor.info
        self.device = info.torch_device
        self.dtype = info.torch_dtype
        self.spec: DecoderSpec = info.spec
        self.max_num_batched_tokens = info.max_num_batched_tokens
        self.kv_sizing: KVCacheSizing = self.executor.determine_kv_cache_sizing()
        self.max_model_len = self._resolve_max_model_len()
        self.executor.initialize_cache(self.kv_sizing.num_blocks, self.max_model_len)
        block_size = config.cache.block_size
        self.kv_cache_manager = KVCacheManager(
            self.kv_sizing.num_blocks, block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.kv_cache_manager, config.scheduler.max_num_seqs,
                                   self.max_num_batched_tokens, self.max_model_len)
        self.async_scheduling = config.scheduler.async_scheduling
        # Launched steps not collected yet (one at most between steps: async scheduling).
        self._in_flight: InFlightStep | None = None
        self._last_collect_end = 0.0
        # Seconds spent inside steps that computed tokens, and the tokens they sampled.
        self.busy_seconds = 0.0
        self.num_generated_tokens = 0
        self.num_steps = 0
        # Per-step stage timing, off unless asked for (set_step_timing): the record of the step() in progress,
        # and the finished ones not taken yet (oldest dropped past 100000).
        self._timing: StepTiming | None = None
        self._step_timing = False
        self._step_timings: deque[StepTiming] = deque(maxlen=100_000)
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s); max_model_len %d; "
            "max concurrency at max_model_len %.1f",
            self.kv_sizing.num_blocks, block_size, self.kv_sizing.num_tokens,
            self.kv_sizing.num_blocks * self.kv_sizing.bytes_per_block / 2**20, self.dtype,
            self.max_model_len, self.kv_sizing.num_tokens / self.max_model_len,
        )
        facts = self.executor.engine_facts()
        log_rank_memory(config, self.model_dir, facts.get("ranks", facts), self.kv_sizing.num_blocks)
        freeze_gc_heap()

    # ---- the in-process worker (device-side attributes, for tests and benchmarks) ----------------------------
    @property
    def worker(self) -> Worker:
        """The worker, when it runs in this process (distributed_executor_backend="uni")."""
        if not isinstance(self.executor, UniProcExecutor):
            raise AttributeError("the worker runs in another process (distributed_executor_backend='mp'): "
                                 "its model, KV tensors and runner are not reachable from here")
        return self.executor.worker

    @property
    def model(self) -> Any:
        return self.worker.model

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        return self.worker.kv_caches

    @property
    def runner(self) -> ModelRunner:
        return self.worker.runner

    @property
    def graph_runner(self) -> Any:
        return self.worker.graph_runner

    @property
    def graph_capture_seconds(self) -> float | None:
        return self.worker.graph_capture_seconds

    @property
    def memory_profile(self) -> MemoryProfile | None:
        return self.worker.memory_profile

    def shutdown(self) -> None:
        """Stop the worker (a child process with distributed_executor_backend="mp")."""
        self.executor.shutdown()

    def scheduler_stats(self) -> SchedulerStats:
        """The latest scheduler stats with the engine's step counters: the one stats surface of the core."""
        stats = self.scheduler.make_stats()
        return SchedulerStats(
            num_running=stats.num_running, num_waiting=stats.num_waiting, kv_cache_usage=stats.kv_cache_usage,
            prefix_cache_queries=stats.prefix_cache_queries, prefix_cache_hits=stats.prefix_cache_hits,
            num_preemptions=stats.num_preemptions, busy_seconds=self.busy_seconds, num_steps=self.num_steps,
            num_kv_blocks=self.kv_sizing.num_blocks, block_size=self.kv_sizing.block_size,
        )

    def engine_info(self) -> dict[str, Any]:
        """What the engine settled at start-up, as plain data: the resolved config's sizes, the KV cache and
        the worker's device facts (device, dtype, attention backend, weight bytes, CUDA graph sizes and capture
        seconds, the GPU memory profile)."""
        sizing = self.kv_sizing
        return {
            **self.executor.engine_facts(),
            "max_model_len": self.max_model_len, "max_num_seqs": self.config.scheduler.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens, "num_kv_blocks": sizing.num_blocks,
            "block_size": sizing.block_size, "kv_bytes_per_block": sizing.bytes_per_block,
            "kv_bytes_per_token": sizing.bytes_per_block // sizing.block_size,
            "async_scheduling": self.async_scheduling,
            "distributed_executor_backend": self.config.distributed_executor_backend,
        }

    def set_step_timing(self, enabled: bool) -> None:
        """Record every step's stages (StepTiming) until switched off; switching drops the records not taken.
        It may be switched at any time: with async scheduling, the first record after switching it on may lack
        the runner's stages of the step already in flight."""
        self._step_timing = bool(enabled)
        self.executor.set_step_timing(self._step_timing)
        self._step_timings.clear()

    def take_step_timings(self) -> list[StepTiming]:
        """The steps' stage timings recorded since the last call, oldest first."""
        timings = list(self._step_timings)
        self._step_timings.clear()
        return timings

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

    def _grammar_matcher(self, params: StructuredOutputsParams) -> GrammarMatcher:
        """The in-process runner's matchers come from the engine's compile cache (the compile that decided the
        request's admission)."""
        return self.structured_outputs.compile(params).matcher()

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
        if not self._step_timing:
            return self._step()
        start = time.perf_counter()
        self._timing = StepTiming()
        try:
            outputs = self._step()
            self._timing.step = time.perf_counter() - start
            self._step_timings.append(self._timing)
        finally:
            self._timing = None
        return outputs

    def _schedule(self) -> SchedulerOutput:
        if self._timing is None:
            return self.scheduler.schedule()
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        self._timing.schedule += time.perf_counter() - start
        self._timing.num_scheduled_tokens = sched.total_num_scheduled_tokens
        return sched

    def _step(self) -> list[EngineCoreOutput]:
        failed = self._poll_grammars() if self._compiling else []
        if self.async_scheduling:
            outputs = failed + self._step_async()
        else:
            sched = self._schedule()
            outputs = failed + ([] if sched.is_empty else self._collect(self._launch(sched)))
        if not outputs and self._compiling and self._in_flight is None:
            time.sleep(0.001)  # every request left waits for its grammar: do not spin
        return outputs

    def _launch(self, sched: SchedulerOutput) -> InFlightStep:
        start = time.perf_counter()
        self.executor.launch(sched)
        if self._timing is not None:
            self._timing.launch += time.perf_counter() - start
        needs_sync = self.scheduler.on_launched(sched)
        self.num_steps += 1
        return InFlightStep(sched, start, needs_sync)

    def _step_async(self) -> list[EngineCoreOutput]:
        """Schedule and launch step N+1, then collect step N while N+1 runs on the device.

        Step N+1 reads the tokens sampled by N on the device. A request whose logits processors need each
        output token on the host (penalties, min_tokens, a grammar matcher: LogitsProcessor.needs_output_tokens)
        makes the engine collect N before scheduling N+1.
        """
        outputs: list[EngineCoreOutput] = []
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None and in_flight.needs_sync:
            outputs = self._collect(in_flight)
            in_flight = None
        sched = self._schedule()
        if not sched.is_empty:
            self._in_flight = self._launch(sched)
        if in_flight is not None:
            outputs += self._collect(in_flight)
        self._collect_if_idle()
        return outputs

    def _collect(self, step: InFlightStep) -> list[EngineCoreOutput]:
        timing = self._timing
        waited = time.perf_counter()
        runner_out = self.executor.collect()
        end = time.perf_counter()
        # Async steps overlap: each is charged from its launch, or the previous collection if later, to its
        # collection (a synchronous step: from its launch).
        elapsed = end - max(step.start, self._last_collect_end)
        self._last_collect_end = end
        self.busy_seconds += elapsed
        self.num_generated_tokens += len(runner_out.sampled)
        if timing is None:
            return self.scheduler.update_from_output(step.sched, runner_out, elapsed)
        timing.collect += end - waited
        timing.num_collected += 1
        for stage, seconds in (runner_out.stage_seconds or {}).items():
            timing.add(stage, seconds)
        outputs = self.scheduler.update_from_output(step.sched, runner_out, elapsed)
        timing.update += time.perf_counter() - end
        return outputs
