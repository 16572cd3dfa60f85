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
        bs = self.block_size
        ids_parts, pos_parts, slot_parts = [], [], []
        query_start_loc = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        for item in sched.scheduled:
            request, n = item.request, item.num_new_tokens
            start = request.num_computed_tokens
            block_ids = self.kv.block_ids(request.request_id)
            positions = np.arange(start, start + n)
            ids_parts.append(request.all_token_ids[start : start + n])
            pos_parts.append(positions)
            slot_parts.append(np.asarray(block_ids, dtype=np.int64)[positions // bs] * bs + positions % bs)
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(start + n)
            tables.append(block_ids)
        max_blocks = max(len(t) for t in tables)
        table_array = np.zeros((len(tables), max_blocks), dtype=np.int32)
        for i, t in enumerate(tables):
            table_array[i, : len(t)] = t
        dev = self.device
        input_ids = torch.tensor([t for part in ids_parts for t in part], dtype=torch.long, device=dev)
        positions = torch.from_numpy(np.concatenate(pos_parts)).to(dev)
        block_tables = torch.from_numpy(table_array).to(dev)
        meta = AttentionMetadata.build(query_start_loc, seq_lens, block_tables,
                                       torch.from_numpy(np.concatenate(slot_parts)).to(dev))
        return input_ids, positions, meta

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
