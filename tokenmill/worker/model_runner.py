"""Builds the flat batch of one engine step, runs the model once over it, and samples.

The runner keeps its own state of every request it runs (CachedRequestState: token ids, block table,
sampling state with the seeded generator and the logits processors), created from a SchedulerOutput's
NewRequestData and updated from its diffs (CachedRequestData, finished and preempted ids). It never sees
a Request or the KV cache manager: everything it needs arrives as plain data, so the scheduler and the
runner can live in different processes.

A step is launched (state updated, batch built, forward and sampling queued on the device, the samples' copy
to the host started) and then collected (wait for the step, read the samples, append them to the requests'
token ids and let the logits processors accept them). A synchronous engine collects each step at once; async
scheduling launches step N+1 before it collects step N, and N+1 reads N's sampled tokens on the device.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.distributed import (
    CollectiveTime,
    get_pp_group,
    get_pp_reverse_group,
    get_tp_group,
    take_collective_time,
)
from tokenmill.model.llama import IntermediateTensors, LlamaForCausalLM
from tokenmill.model.pooler import pool_chunk
from tokenmill.outputs import ModelRunnerOutput, NewRequestData, SchedulerOutput
from tokenmill.sample.logits_processor import LogitsProcessor, build_logits_processors
from tokenmill.sample.sampler import Sampler, SamplerOutput, top_logprobs
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output.bitmask import TRACING_LOCK

if TYPE_CHECKING:
    from tokenmill.structured_output.backend import GrammarMatcher
    from tokenmill.structured_output.params import StructuredOutputsParams

# A structured-outputs spec -> a fresh matcher for one sequence (compiles, or takes the compile cache's).
GrammarFactory = Callable[["StructuredOutputsParams"], "GrammarMatcher"]


@dataclass
class CachedRequestState:
    """The runner's copy of one request."""

    request_id: str
    prompt_token_ids: list[int]
    # Prompt and sampled tokens known on the host (a token sampled by the step in flight is not here yet).
    token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    # Prompt + every token sampled by a launched step, collected or not: a step samples when its scheduled
    # tokens reach this count.
    num_tokens: int
    generator: torch.Generator | None = None
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    num_preemptions: int = 0
    pooling_type: str | None = None
    num_prompt_logprobs_done: int = 0

    def __post_init__(self) -> None:
        self.wants_prompt_logprobs = self.sampling_params.prompt_logprobs is not None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_token(self, token_id: int) -> tuple[bool, str | None]:
        """Append a sampled token and let every logits processor accept it. Returns (whether a processor ended
        the sequence, why one refused the token or None)."""
        self.token_ids.append(token_id)
        ended = False
        for processor in self.logits_processors:
            if not processor.accept_token(token_id):
                return True, (f"a {type(processor).__name__} refused sampled token {token_id} of request "
                              f"{self.request_id!r}")
            ended = ended or processor.is_terminated()
        return ended, None


class StageTimer:
    """Times a step's stages in the runner: device time by CUDA events on CUDA (read once the step is done),
    host time by perf_counter on CPU, where the work runs when it is called."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds: dict[str, float] = {}  # stage -> seconds
        self._started: dict[str, float] = {}  # stage -> perf_counter() at its start (CPU)
        self._events: dict[str, tuple[torch.cuda.Event, torch.cuda.Event]] = {}  # stage -> (start, end) (CUDA)

    def start(self, stage: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events[stage] = (event, event)
        else:
            self._started[stage] = time.perf_counter()

    def stop(self, stage: str) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[stage] = (self._events[stage][0], end)
        else:
            self.seconds[stage] = time.perf_counter() - self._started.pop(stage)

    def result(self) -> dict[str, float]:
        """The stages' seconds; on CUDA call it after the step's work has finished."""
        for stage, (start, end) in self._events.items():
            self.seconds[stage] = start.elapsed_time(end) / 1e3
        self._events.clear()
        return self.seconds


@dataclass
class LaunchedStep:
    """A step queued on the device whose samples the host has not read yet."""

    output: ModelRunnerOutput  # prompt logprobs already in; sampled filled by ModelRunner.collect
    sample_ids: list[str] = field(default_factory=list)  # the sampling requests, in row order
    sampled: SamplerOutput | None = None  # on the device: the next step may read its token ids
    host_sampled: SamplerOutput | None = None  # the same, on its way to the host
    done: torch.cuda.Event | None = None  # CUDA: recorded after the step's last work (the samples' copy)
    start: float = 0.0  # perf_counter() when the launch began
    timer: StageTimer | None = None  # while step timing is on
    collectives: CollectiveTime | None = None  # tensor parallelism, while step timing is on: its collectives
    # Pipeline parallelism: sends still in flight (activations to the next stage, sampled ids to the earlier
    # ones) and the tensors they send (kept alive until done); the [start, end) sampled rows of each microbatch,
    # and on an earlier stage each microbatch's receive of its sampled ids (into `sampled`); on the last stage
    # the samples of each microbatch.
    pp_sends: list[torch.distributed.Work] = field(default_factory=list)
    pp_buffers: list[torch.Tensor] = field(default_factory=list)
    pp_sample_bounds: list[tuple[int, int]] = field(default_factory=list)
    pp_recvs: list[list[torch.distributed.Work]] = field(default_factory=list)
    pp_sampled: list[SamplerOutput] = field(default_factory=list)


def new_request_state(new: NewRequestData, grammar: GrammarMatcher | None = None,
                      generator: torch.Generator | None = None, samples: bool = True) -> CachedRequestState:
    """The runner's state of a request from its NewRequestData: tokens, block table, a seeded request's
    generator (`generator`: the one it had before a preemption, else a new one from the seed) and fresh logits
    processors (grammar: the sequence's matcher under structured outputs), which replay the output so far.
    samples=False (a pipeline stage before the last, which never samples): no logits processors."""
    params = new.sampling_params
    tokens = list(new.prompt_token_ids) + list(new.output_token_ids)
    if generator is None and params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    processors = (build_logits_processors(params, new.prompt_token_ids, new.eos_token_ids, grammar)
                  if new.pooling_type is None and samples else [])
    for token_id in new.output_token_ids:
        for processor in processors:
            if not processor.accept_token(token_id):
                raise RuntimeError(f"a logits processor of request {new.request_id!r} refused output token "
                                   f"{token_id} while replaying")
    return CachedRequestState(
        new.request_id, list(new.prompt_token_ids), tokens, params, list(new.block_ids), new.num_computed_tokens,
        len(tokens), generator, processors, new.num_preemptions, new.pooling_type, new.num_prompt_logprobs_done,
    )


def split_microbatches(num_scheduled_tokens: list[int], num_microbatches: int) -> list[tuple[int, int]]:
    """[start, end) ranges of a step's requests, contiguous and in order, at most num_microbatches of them (one
    request each at least), their tokens as even as whole requests allow: boundary k goes where the running
    token count comes closest to k / num_microbatches of the total. Every rank computes the same split from the
    same SchedulerOutput.

    >>> split_microbatches([1, 1, 1, 1, 1], 2)
    [(0, 2), (2, 5)]
    >>> split_microbatches([40, 1, 1, 1], 2)
    [(0, 1), (1, 4)]
    """
    n = len(num_scheduled_tokens)
    m = max(1, min(num_microbatches, n))
    cumulative = [0, *itertools.accumulate(num_scheduled_tokens)]  # tokens of requests [0, j)
    total = cumulative[-1]
    bounds = [0]
    for k in range(1, m):
        target = total * k / m
        # Leave at least one request for each microbatch still to come.
        candidates = range(bounds[-1] + 1, n - (m - k) + 1)
        bounds.append(min(candidates, key=lambda j: abs(cumulative[j] - target)))
    bounds.append(n)
    return list(itertools.pairwise(bounds))


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        sampler: Sampler,
        device: torch.device,
        graph_runner=None,
        grammar_factory: GrammarFactory | None = None,
    ) -> None:
        self.model = model
        # A CUDAGraphRunner replays captured decode steps and falls back to the model for the rest.
        self.forward = graph_runner if graph_runner is not None else model
        # One tensor per layer: [2, num_blocks, block_size, num_kv_heads, head_dim].
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.device = device
        self.grammar_factory = grammar_factory
        # request_id -> the runner's state of every request it runs.
        self.requests: dict[str, CachedRequestState] = {}
        # request_id -> the generator of a seeded request while it is preempted: its draws continue where they
        # stopped, so that a recomputed request samples what it would have without the preemption.
        self._preempted_generators: dict[str, torch.Generator] = {}
        # Time each step's stages (build batch, forward, sample) into its output's stage_seconds.
        self.step_timing = False
        # Tensor parallelism: tp rank 0 gathers the logits and samples; it broadcasts the sampled token ids, so
        # that every rank appends the same tokens to its copy of the requests.
        self.tp_group = get_tp_group()
        # Pipeline parallelism: this rank's stage runs its layers over the step in microbatches (one per stage),
        # receiving each from the previous stage and sending it on; the last stage samples and sends the
        # sampled ids back to every earlier stage (see _launch_pipeline).
        self.pp_group = get_pp_group()
        # The sampled ids travel back on a group of their own: on NCCL a group's operations between two ranks run
        # in the order they were issued, and the receives of ids, posted early, must not hold back activations.
        self.pp_reverse_group = get_pp_reverse_group()
        self.num_microbatches = self.pp_group.world_size
        # Seconds this stage spent on steps other than waiting for another stage (the pipeline's busy time), and
        # seconds it waited for one.
        self.pipeline_busy_seconds = 0.0
        self._pp_waited = 0.0

    # ---- state ----------------------------------------------------------------------------------------------
    def update_states(self, sched: SchedulerOutput) -> None:
        """Apply a SchedulerOutput's finished / preempted ids, new requests and diffs to the runner's state."""
        for request_id in sched.finished_request_ids:
            self.requests.pop(request_id, None)
            self._preempted_generators.pop(request_id, None)
        for request_id in sched.preempted_ids:
            state = self.requests.pop(request_id, None)
            if state is not None and state.generator is not None:
                self._preempted_generators[request_id] = state.generator
        for new in sched.new_requests:
            self.requests[new.request_id] = self._new_state(new)
        cached = sched.cached_requests
        for request_id, new_block_ids, num_computed in zip(cached.request_ids, cached.new_block_ids,
                                                           cached.num_computed_tokens, strict=True):
            state = self.requests[request_id]
            state.block_ids.extend(new_block_ids)
            state.num_computed_tokens = num_computed

    def _new_state(self, new: NewRequestData) -> CachedRequestState:
        params = new.sampling_params
        grammar = None
        # A pipeline stage before the last never samples: no grammar to compile, no processor to feed.
        samples = self.model.is_last_stage
        if params.structured_outputs is not None and new.pooling_type is None and samples:
            if self.grammar_factory is None:
                raise RuntimeError("a request with structured_outputs reached a runner without a grammar compiler")
            grammar = self.grammar_factory(params.structured_outputs)
        return new_request_state(new, grammar, self._preempted_generators.pop(new.request_id, None), samples)

    # ---- the step -------------------------------------------------------------------------------------------
    def to_device(self, values: list[int] | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """A host list or array on the model's device. On CUDA the copy goes through pinned memory without
        waiting for the device, so a step can be built while the previous one still runs."""
        t = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _build_batch(self, states: list[CachedRequestState], num_new: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[tuple[int, str]]]:
        """Flat token ids, positions and metadata of the step, with one host-to-device copy per tensor, and the
        (row, request id) of every input token still on the device (sampled by the step in flight).

        A decode (one new token) is a few list appends; only a prefill chunk goes through numpy. Every
        list is converted once at the end.
        """
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        pending: list[tuple[int, str]] = []
        num_tokens = 0
        for state, n in zip(states, num_new, strict=True):
            start = state.num_computed_tokens
            block_ids = state.block_ids
            token_ids = state.token_ids
            if n == 1:
                if start < len(token_ids):
                    ids.append(token_ids[start])
                else:
                    pending.append((num_tokens, state.request_id))
                    ids.append(0)
                positions.append(start)
                slots.append(block_ids[start // bs] * bs + start % bs)
            else:
                pos = np.arange(start, start + n)
                ids.extend(token_ids[start : start + n])
                positions.extend(range(start, start + n))
                slots.extend((np.asarray(block_ids, dtype=np.int64)[pos // bs] * bs + pos % bs).tolist())
            num_tokens += n
            query_start_loc.append(num_tokens)
            seq_lens.append(start + n)
            tables.append(block_ids)
        table_array = np.zeros((len(tables), max(map(len, tables))), dtype=np.int32)
        for i, t in enumerate(tables):
            table_array[i, : len(t)] = t
        to_device = self.to_device
        meta = AttentionMetadata.build(query_start_loc, seq_lens, to_device(table_array, torch.int32),
                                       to_device(slots, torch.long), to_device=to_device)
        return to_device(ids, torch.long), to_device(positions, torch.long), meta, pending

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Apply the step's state updates, then queue its forward and sampling on the device, and the copy of its
        samples to the host; on CUDA nothing here waits for the device (except prompt logprobs, which are
        rare). Input tokens sampled by `prev`, the step in flight, are read from its device tensor.

        With pipeline parallelism this rank runs its stage of the step instead (_launch_pipeline). Never while
        the bitmask kernel compiles in the background (TRACING_LOCK)."""
        with TRACING_LOCK:
            return self._launch(sched, prev)

    def _launch(self, sched: SchedulerOutput, prev: LaunchedStep | None) -> LaunchedStep:
        start = time.perf_counter()
        timer = StageTimer(self.device.type == "cuda") if self.step_timing else None
        self.update_states(sched)
        requests = self.requests
        states = [requests[request_id] for request_id in sched.num_scheduled_tokens]
        num_new = list(sched.num_scheduled_tokens.values())
        step = LaunchedStep(ModelRunnerOutput(sampled={}), start=start, timer=timer)
        if self.pp_group.world_size > 1:
            waited = self._pp_waited
            self._launch_pipeline(states, num_new, prev, step)
            self.pipeline_busy_seconds += time.perf_counter() - start - (self._pp_waited - waited)
            return step
        input_ids, positions, meta, pending = self._build_batch(states, num_new)
        if pending:
            self._fill_pending(input_ids, pending, prev)
        if timer is not None:
            timer.seconds["build_batch"] = time.perf_counter() - start  # host work: state updates and the batch
            timer.start("forward")
        hidden = self.forward(input_ids, positions, self.kv_caches, meta)
        if timer is not None:
            timer.stop("forward")
        sample_rows, sample_states = self._process_rows(states, num_new, hidden, step.output)
        step.sample_ids = [s.request_id for s in sample_states]
        if sample_rows:
            step.sampled = self._sample(hidden, sample_rows, sample_states, timer)
            step.host_sampled = step.sampled
            if self.device.type == "cuda":
                step.host_sampled = step.sampled.map_tensors(lambda t: t.to("cpu", non_blocking=True))
            for state in sample_states:
                state.num_tokens += 1
        if timer is not None and self.tp_group.world_size > 1:
            step.collectives = take_collective_time()
        if self.device.type == "cuda":
            step.done = torch.cuda.Event()
            step.done.record()
        return step

    def _process_rows(self, states: list[CachedRequestState], num_new: list[int], hidden: torch.Tensor | None,
                      out: ModelRunnerOutput) -> tuple[list[int], list[CachedRequestState]]:
        """After the forward over these requests' tokens (hidden: their final hidden states, in order; None on a
        pipeline stage other than the last): pool the pooling requests' chunks, compute the prompt logprobs
        asked for, advance num_computed_tokens, and return the rows that sample with their requests."""
        sample_rows: list[int] = []
        sample_states: list[CachedRequestState] = []
        first = 0
        for state, n in zip(states, num_new, strict=True):
            computed = state.num_computed_tokens
            if state.pooling_type is not None:  # prefill only: pooled, never sampled
                if hidden is not None:
                    out.pooled[state.request_id] = pool_chunk(
                        hidden[first : first + n], state.pooling_type, state.num_preemptions, computed,
                        state.num_prompt_tokens,
                    )
            else:
                if computed + n == state.num_tokens:
                    sample_rows.append(first + n - 1)
                    sample_states.append(state)
                if state.wants_prompt_logprobs and hidden is not None:
                    self._prompt_logprobs(hidden, first, n, state, out)
            state.num_computed_tokens = computed + n
            first += n
        return sample_rows, sample_states

    def _sample(self, hidden: torch.Tensor, sample_rows: list[int], sample_states: list[CachedRequestState],
                timer: StageTimer | None) -> SamplerOutput:
        """The next token of each sampling row (logits on tp rank 0, its sampled ids broadcast to the other
        tensor-parallel ranks)."""
        if timer is not None:
            timer.start("logits")
        if len(sample_rows) < hidden.shape[0]:
            hidden = hidden.index_select(0, self.to_device(sample_rows, torch.long))
        # else every row samples: the rows are 0..n-1 in order.
        logits = self.model.compute_logits(hidden)  # None on a tensor-parallel rank other than 0
        if timer is not None:
            timer.stop("logits")
            timer.start("sample")
        if logits is not None:
            sampled = self.sampler.sample(logits, sample_states)
        else:
            sampled = SamplerOutput(torch.empty(len(sample_rows), dtype=torch.long, device=self.device))
        if self.tp_group.world_size > 1:
            token_ids = sampled.token_ids.to(torch.long).contiguous()
            sampled.token_ids = self.tp_group.broadcast(token_ids, src=0)
        if timer is not None:
            timer.stop("sample")
        return sampled

    def _fill_pending(self, input_ids: torch.Tensor, pending: list[tuple[int, str]], prev: LaunchedStep | None
                      ) -> None:
        """Write the input tokens still on the device (sampled by `prev`, the step in flight) into input_ids."""
        if prev is None or prev.sampled is None:
            raise RuntimeError("a scheduled token is still pending but no step is in flight")
        index = {request_id: i for i, request_id in enumerate(prev.sample_ids)}
        src_rows = [index[request_id] for _, request_id in pending]
        self._wait_received(prev, max(src_rows))
        rows = self.to_device([row for row, _ in pending], torch.long)
        src = self.to_device(src_rows, torch.long)
        input_ids.index_copy_(0, rows, prev.sampled.token_ids.index_select(0, src))

    # ---- pipeline parallelism -------------------------------------------------------------------------------
    # Each engine step is cut into microbatches (split_microbatches: one per stage, contiguous runs of the
    # scheduled requests with about equal tokens), and every stage runs them in order, GPipe-style: it receives
    # microbatch k from the previous stage (all the step's receives are posted at its start, so a microbatch
    # moves as soon as it is ready), runs its layers over it and starts sending it on without waiting, so stage
    # s works on microbatch k while stage s + 1 works on k - 1. The last stage samples each microbatch as soon
    # as it has it and starts sending its sampled ids to every earlier stage, whose copies of the requests
    # advance by the same tokens. Every microbatch's KV writes land before a later one reads them on the same
    # stage, so the split changes no result (greedy and seeded requests give one stage's tokens; unseeded
    # random ones draw from the shared generator one microbatch at a time).
    #
    # Between steps the pipeline does not drain. With async scheduling the first stage starts microbatch k of
    # step N+1 as soon as the ids sampled for microbatch k of step N arrive (a decode batch keeps its split from
    # step to step), while the last stage still runs step N's later microbatches; the executor hands the last
    # stage the collect of step N before the launch of N+1, so that the engine gets N's tokens without waiting
    # for N+1 (MultiprocExecutor). Without async scheduling each step fills and drains the pipeline: a stage is
    # then busy M / (2M - 1) of a step at best with M stages (2/3 at PP=2).
    #
    # Why microbatches of one step, and not vLLM's batch queue (up to pipeline_parallel_size steps of disjoint
    # requests in flight, which the engine core would schedule): the scheduler, the engine core and their
    # async-scheduling contract (one step in flight, the next reading its tokens on the device) stay exactly as
    # they are, and the results are one stage's. What it costs is that a stage runs its layers once per
    # microbatch: M reads of its weights per step, which a memory-bound decode pays as a batch queue does.

    def _launch_pipeline(self, states: list[CachedRequestState], num_new: list[int], prev: LaunchedStep | None,
                         step: LaunchedStep) -> None:
        """This rank's stage of the step, microbatch by microbatch (see above). Step timing: build_batch is the
        state updates, forward the whole pipelined part (the last stage's logits and sampling included)."""
        model, pp, timer = self.model, self.pp_group, step.timer
        ranges = split_microbatches(num_new, self.num_microbatches)
        # Which rows sample is known on every stage before any forward: a request samples when this step's
        # tokens reach its num_tokens.
        num_samples = [sum(1 for s, n in zip(states[lo:hi], num_new[lo:hi], strict=True)
                           if s.pooling_type is None and s.num_computed_tokens + n == s.num_tokens)
                       for lo, hi in ranges]
        bounds = [0, *itertools.accumulate(num_samples)]
        step.pp_sample_bounds = list(itertools.pairwise(bounds))
        received: list[IntermediateTensors] = []
        recv_works: list[list[torch.distributed.Work]] = []
        if not model.is_first_stage:
            for lo, hi in ranges:
                buffers = model.empty_intermediate_tensors(sum(num_new[lo:hi]), self.device)
                received.append(buffers)
                recv_works.append(pp.irecv_tensors(buffers.tensors()))
        if not model.is_last_stage and bounds[-1]:
            # The ids the last stage samples, one receive per microbatch (in order after the previous step's).
            token_ids = torch.empty(bounds[-1], dtype=torch.long, device=self.device)
            step.sampled = step.host_sampled = SamplerOutput(token_ids)
            reverse = self.pp_reverse_group
            step.pp_recvs = [reverse.irecv_tensors([token_ids[a:b]], src=reverse.world_size - 1) if b > a else []
                             for a, b in step.pp_sample_bounds]
        if timer is not None:
            timer.seconds["build_batch"] = time.perf_counter() - step.start
            timer.start("forward")
        for k, (lo, hi) in enumerate(ranges):
            mb_states, mb_new = states[lo:hi], num_new[lo:hi]
            input_ids, positions, meta, pending = self._build_batch(mb_states, mb_new)
            intermediate = None
            if model.is_first_stage:
                if pending:
                    self._fill_pending(input_ids, pending, prev)
            else:
                self._wait(recv_works[k])
                intermediate = received[k]
            out = model(input_ids, positions, self.kv_caches, meta, intermediate)
            hidden = None
            if isinstance(out, IntermediateTensors):
                tensors = out.tensors()
                step.pp_sends.extend(pp.isend_tensors(tensors))
                step.pp_buffers.extend(tensors)
            else:
                hidden = out
            sample_rows, sample_states = self._process_rows(mb_states, mb_new, hidden, step.output)
            step.sample_ids.extend(s.request_id for s in sample_states)
            if hidden is not None and sample_rows:
                sampled = self._sample(hidden, sample_rows, sample_states, None)
                token_ids = sampled.token_ids.to(torch.long).contiguous()
                step.pp_buffers.append(token_ids)
                for stage in range(pp.world_size - 1):
                    step.pp_sends.extend(self.pp_reverse_group.isend_tensors([token_ids], dst=stage))
                if self.device.type == "cuda":
                    sampled = sampled.map_tensors(lambda t: t.to("cpu", non_blocking=True))
                step.pp_sampled.append(sampled)
            for state in sample_states:
                state.num_tokens += 1
        if timer is not None:
            timer.stop("forward")
        if self.device.type == "cuda":
            step.done = torch.cuda.Event()
            step.done.record()

    def _wait_received(self, step: LaunchedStep, row: int | None = None) -> None:
        """Wait for the sampled ids an earlier stage receives for `step`: those of the microbatches up to the
        one holding sampled row `row`, or all of them."""
        for k, (a, _) in enumerate(step.pp_sample_bounds):
            if row is not None and a > row:
                break
            if k < len(step.pp_recvs) and step.pp_recvs[k]:
                self._wait(step.pp_recvs[k])
                step.pp_recvs[k] = []

    def _wait(self, works: list[torch.distributed.Work]) -> None:
        """Wait for sends or receives between stages, counting the time as waiting, not work."""
        start = time.perf_counter()
        for work in works:
            work.wait()
        self._pp_waited += time.perf_counter() - start

    def collect(self, step: LaunchedStep) -> ModelRunnerOutput:
        """Wait for a launched step (its forward and its samples' copy), append the sampled tokens to the
        requests' state, let their logits processors accept them, and return the runner's output."""
        if self.pp_group.world_size == 1:
            return self._collect(step)
        start, waited = time.perf_counter(), self._pp_waited
        self._wait_received(step)
        self._wait(step.pp_sends)
        step.pp_sends, step.pp_buffers = [], []
        out = self._collect(step)
        self.pipeline_busy_seconds += time.perf_counter() - start - (self._pp_waited - waited)
        return out

    def _collect(self, step: LaunchedStep) -> ModelRunnerOutput:
        if step.done is not None:
            step.done.synchronize()
        if step.timer is not None:
            step.output.stage_seconds = step.timer.result()
            if step.collectives is not None:
                # Part of forward, logits and sample: the all-reduces, the logits' gather, the tokens' broadcast.
                step.output.stage_seconds["collectives"] = step.collectives.seconds()
        if step.pp_sampled:  # the last pipeline stage: sampled microbatch by microbatch
            sampled = [token for part in step.pp_sampled for token in part.to_host()]
        elif step.host_sampled is not None:
            sampled = step.host_sampled.to_host()
        else:
            return step.output
        out = step.output
        out.sampled = dict(zip(step.sample_ids, sampled, strict=True))
        requests = self.requests
        for request_id, token in out.sampled.items():
            state = requests.get(request_id)
            if state is None:  # preempted or finished while the step ran: nothing left to advance
                continue
            if not state.logits_processors:
                state.token_ids.append(token.token_id)
                continue
            ended, error = state.append_token(token.token_id)
            if ended:
                out.processor_finished[request_id] = error
        return out

    def _prompt_logprobs(self, hidden: torch.Tensor, row: int, num_new: int, state: CachedRequestState,
                         out: ModelRunnerOutput) -> None:
        """Logprobs of prompt tokens 1.. given their prefixes, for the prompt positions computed this step."""
        start = state.num_computed_tokens
        # A recomputed (preempted) request already reported its earlier positions.
        first = max(start, state.num_prompt_logprobs_done)
        end = min(start + num_new, state.num_prompt_tokens - 1)
        if end <= first:
            return
        logits = self.model.compute_logits(hidden[row + first - start : row + end - start])
        state.num_prompt_logprobs_done = end
        if logits is None:  # a tensor-parallel rank other than 0: the logits were gathered on rank 0
            return
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(state.prompt_token_ids[first + 1 : end + 1], device=logits.device)
        out.prompt_logprobs[state.request_id] = top_logprobs(
            logprobs, targets, state.sampling_params.prompt_logprobs or 0
        )
        state.num_prompt_logprobs_done = end
