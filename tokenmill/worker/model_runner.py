"""Builds the flat batch of one engine step, runs the model once over it, and samples.

A step is launched (batch built, forward and sampling queued on the device, the samples' copy to the host
started) and then collected (wait for the step, read the samples). A synchronous engine collects each step
at once; async scheduling launches step N+1 before it collects step N.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.pooler import pool_chunk
from tokenmill.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.request import Request
from tokenmill.sample.sampler import Sampler, SamplerOutput, top_logprobs


@dataclass
class LaunchedStep:
    """A step queued on the device whose samples the host has not read yet."""

    sched: SchedulerOutput
    output: ModelRunnerOutput  # prompt logprobs already in; sampled filled by ModelRunner.collect
    sample_requests: list[Request] = field(default_factory=list)
    sampled: SamplerOutput | None = None  # on the device: the next step may read its token ids
    host_sampled: SamplerOutput | None = None  # the same, on its way to the host
    done: torch.cuda.Event | None = None  # CUDA: recorded after the step's last work (the samples' copy)
    start: float = 0.0  # perf_counter() when the launch began

    @property
    def needs_sync(self) -> bool:
        """Whether the next step must wait for this one's tokens on the host: penalties and min_tokens read a
        request's output tokens as the sampler runs, and a grammar matcher must accept a token before it can
        mask the next."""
        return any(r.sampling_params.needs_penalties or r.sampling_params.min_tokens > 0
                   or r.structured_output is not None for r in self.sample_requests)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        kv_cache_manager: KVCacheManager,
        sampler: Sampler,
        device: torch.device,
        graph_runner=None,
    ) -> None:
        self.model = model
        # A CUDAGraphRunner replays captured decode steps and falls back to the model for the rest.
        self.forward = graph_runner if graph_runner is not None else model
        # One tensor per layer: [2, num_blocks, block_size, num_kv_heads, head_dim].
        self.kv_caches = kv_caches
        self.kv = kv_cache_manager
        self.block_size = kv_cache_manager.block_size
        self.sampler = sampler
        self.device = device

    def to_device(self, values: list[int] | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """A host list or array on the model's device. On CUDA the copy goes through pinned memory without
        waiting for the device, so a step can be built while the previous one still runs."""
        t = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _build_batch(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                           list[tuple[int, Request]]]:
        """Flat token ids, positions and metadata of the step, with one host-to-device copy per tensor, and the
        (row, request) of every input token still on the device (sampled by the step in flight).

        A decode (one new token) is a few list appends; only a prefill chunk goes through numpy. Every
        list is converted once at the end.
        """
        bs = self.block_size
        block_ids_of = self.kv.block_ids
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        pending: list[tuple[int, Request]] = []
        num_tokens = 0
        for item in sched.scheduled:
            request, n = item.request, item.num_new_tokens
            start = request.num_computed_tokens
            block_ids = block_ids_of(request.request_id)
            if n == 1:
                if start < len(request.all_token_ids):
                    ids.append(request.all_token_ids[start])
                else:
                    pending.append((num_tokens, request))
                    ids.append(0)
                positions.append(start)
                slots.append(block_ids[start // bs] * bs + start % bs)
            else:
                pos = np.arange(start, start + n)
                ids.extend(request.all_token_ids[start : start + n])
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
        """Queue one step's forward and sampling on the device, and the copy of its samples to the host; on
        CUDA nothing here waits for the device (except prompt logprobs, which are rare). Input tokens sampled
        by `prev`, the step in flight, are read from its device tensor."""
        start = time.perf_counter()
        input_ids, positions, meta, pending = self._build_batch(sched)
        if pending:
            if prev is None or prev.sampled is None:
                raise RuntimeError("a scheduled token is still pending but no step is in flight")
            index = {r.request_id: i for i, r in enumerate(prev.sample_requests)}
            rows = self.to_device([row for row, _ in pending], torch.long)
            src = self.to_device([index[r.request_id] for _, r in pending], torch.long)
            input_ids.index_copy_(0, rows, prev.sampled.token_ids.index_select(0, src))
        hidden = self.forward(input_ids, positions, self.kv_caches, meta)

        sample_rows, sample_requests = [], []
        out = ModelRunnerOutput(sampled={})
        for i, item in enumerate(sched.scheduled):
            request = item.request
            if request.pooler is not None:  # prefill only: pooled, never sampled
                first = meta.query_start_loc_list[i]
                out.pooled[request.request_id] = pool_chunk(
                    hidden[first : first + item.num_new_tokens], request.pooler.pooling_type,
                    request.num_preemptions, request.num_computed_tokens, request.num_prompt_tokens,
                )
                continue
            if item.samples:
                sample_rows.append(meta.query_start_loc_list[i + 1] - 1)
                sample_requests.append(request)
            if request.prompt_logprobs is not None:
                self._prompt_logprobs(hidden, meta.query_start_loc_list[i], item.num_new_tokens, request, out)
        step = LaunchedStep(sched, out, sample_requests, start=start)
        if sample_rows:
            if len(sample_rows) < hidden.shape[0]:
                hidden = hidden.index_select(0, self.to_device(sample_rows, torch.long))
            # else every row samples: the rows are 0..n-1 in order.
            step.sampled = self.sampler.sample(self.model.compute_logits(hidden), sample_requests)
            step.host_sampled = step.sampled
            if self.device.type == "cuda":
                step.host_sampled = step.sampled.map_tensors(lambda t: t.to("cpu", non_blocking=True))
        if self.device.type == "cuda":
            step.done = torch.cuda.Event()
            step.done.record()
        return step

    def collect(self, step: LaunchedStep) -> ModelRunnerOutput:
        """Wait for a launched step (its forward and its samples' copy) and return the runner's output."""
        if step.done is not None:
            step.done.synchronize()
        if step.host_sampled is not None:
            sampled = step.host_sampled.to_host()
            step.output.sampled = {r.request_id: s for r, s in zip(step.sample_requests, sampled, strict=True)}
        return step.output

    def _prompt_logprobs(self, hidden: torch.Tensor, row: int, num_new: int, request, out: ModelRunnerOutput) -> None:
        """Logprobs of prompt tokens 1.. given their prefixes, for the prompt positions computed this step."""
        start = request.num_computed_tokens
        # A recomputed (preempted) request already reported its earlier positions.
        first = max(start, len(request.prompt_logprobs) - 1)
        end = min(start + num_new, request.num_prompt_tokens - 1)
        if end <= first:
            return
        logits = self.model.compute_logits(hidden[row + first - start : row + end - start])
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(request.prompt_token_ids[first + 1 : end + 1], device=logits.device)
        out.prompt_logprobs[request.request_id] = top_logprobs(
            logprobs, targets, request.sampling_params.prompt_logprobs
        )
