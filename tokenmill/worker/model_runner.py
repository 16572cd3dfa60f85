"""Builds the flat batch of one engine step, runs the model once over it, and samples."""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.sample.sampler import Sampler, top_logprobs


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

    def _build_batch(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat token ids, positions and metadata of the step, with one host-to-device copy per tensor.

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
        num_tokens = 0
        for item in sched.scheduled:
            request, n = item.request, item.num_new_tokens
            start = request.num_computed_tokens
            block_ids = block_ids_of(request.request_id)
            if n == 1:
                ids.append(request.all_token_ids[start])
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
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        meta = AttentionMetadata.build(query_start_loc, seq_lens, torch.from_numpy(table_array).to(dev),
                                       torch.tensor(slots, dtype=torch.long, device=dev))
        return input_ids, torch.tensor(positions, dtype=torch.long, device=dev), meta

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        input_ids, positions, meta = self._build_batch(sched)
        hidden = self.forward(input_ids, positions, self.kv_caches, meta)

        sample_rows, sample_requests = [], []
        out = ModelRunnerOutput(sampled={})
        for i, item in enumerate(sched.scheduled):
            request = item.request
            if item.samples:
                sample_rows.append(meta.query_start_loc_list[i + 1] - 1)
                sample_requests.append(request)
            if request.prompt_logprobs is not None:
                self._prompt_logprobs(hidden, meta.query_start_loc_list[i], item.num_new_tokens, request, out)
        if sample_rows:
            logits = self.model.compute_logits(hidden[sample_rows])
            sampled = self.sampler(logits, sample_requests)
            out.sampled = {r.request_id: s for r, s in zip(sample_requests, sampled, strict=True)}
        return out

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
