"""Attention on the GPU with Triton kernels, behind the same interface as the PyTorch reference backend.

Per layer and step:
  write_kv  one reshape_and_cache launch writes every new token's K/V to its slot (negative slots skipped).
  attend    one paged_prefill_attention launch covers every prefill chunk (cached prefix + new tokens, causal
            with offset, sliding window), and one paged_decode_attention launch (+ a reduce launch when the
            sequence is split) covers every single-token sequence.

The decode path reads only device tensors and Python values that stay fixed for a batch size
(len(decode_rows), max_decode_seq_len), so the CUDA-graph runner can capture it once per batch size: it sets
max_decode_seq_len to max_model_len, which fixes the split count for every replay.
"""

from __future__ import annotations

import torch
import triton

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata
from tokenmill.attention.triton.paged_attention import (
    paged_decode_attention,
    paged_prefill_attention,
    prefill_block_q,
    prefill_work_list,
    reshape_and_cache,
)

# Keys per decode tile and per prefill tile; query rows (tokens x heads of a group) per prefill program.
DECODE_TILE_N = 64
PREFILL_TILE_N = 64
PREFILL_BLOCK_M = 64
# A split shorter than this costs more in its reduce than it gains in parallelism.
MIN_TOKENS_PER_SPLIT = 256


def choose_decode_splits(num_decodes: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                         max_splits: int = 32) -> int:
    """Splits along the sequence for a decode batch: enough (decode, KV head, split) programs for about two
    waves over the GPU's multiprocessors, no split shorter than MIN_TOKENS_PER_SPLIT tokens; a power of two.

    Batch 1 of an 8-KV-head model at 4096 tokens on 132 SMs: 8 programs -> 33 wanted, 16 by length -> 16.
    Batch 64: 512 programs already fill the GPU -> 1.
    """
    programs = max(1, num_decodes * num_kv_heads)
    wanted = triton.cdiv(2 * num_sms, programs)
    by_length = triton.cdiv(max(1, max_seq_len), MIN_TOKENS_PER_SPLIT)
    splits = max(1, min(wanted, by_length, max_splits))
    return 1 << (splits.bit_length() - 1)  # round down to a power of two


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, *, decode_num_splits: int | None = None,
                 max_decode_splits: int = 32) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, sliding_window)
        # A fixed split count for decode (tests use it to exercise the reduce); None: choose_decode_splits.
        self.decode_num_splits = decode_num_splits
        self.max_decode_splits = max_decode_splits
        self.prefill_block_q = prefill_block_q(num_heads, num_kv_heads, PREFILL_BLOCK_M)
        # The prefill work list is built once per step and reused by every layer (they share this backend).
        self._work_meta: AttentionMetadata | None = None
        self._work: torch.Tensor | None = None
        self._num_sms: dict[torch.device, int] = {}  # device -> multiprocessor count

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        reshape_and_cache(key, value, kv_cache, slot_mapping)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(query)  # [num_tokens, num_heads, head_dim]; every row is written below
        if meta.prefill_indices:
            paged_prefill_attention(
                out, query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                self._prefill_work(meta, query.device), self.prefill_block_q, self.scale,
                self.sliding_window, tile_n=PREFILL_TILE_N, num_warps=4,
            )
        if meta.decode_indices:
            rows, seq_lens, tables = meta.decode_rows, meta.decode_seq_lens, meta.decode_block_tables
            if rows is None or seq_lens is None or tables is None:
                idx = torch.tensor(meta.decode_indices, device=query.device)
                rows = meta.query_start_loc[idx]
                seq_lens, tables = meta.seq_lens[idx], meta.block_tables[idx]
            max_len = meta.max_decode_seq_len
            if max_len is None:
                max_len = max(meta.seq_lens_list[i] for i in meta.decode_indices)
            paged_decode_attention(
                out, query, kv_cache, tables, seq_lens, rows, self.scale,
                self.num_decode_splits(rows.shape[0], max_len, query.device), self.sliding_window,
                tile_n=DECODE_TILE_N, num_warps=4,
            )
        return out

    def num_decode_splits(self, num_decodes: int, max_seq_len: int, device: torch.device) -> int:
        if self.decode_num_splits is not None:
            return self.decode_num_splits
        if self.sliding_window is not None:
            max_seq_len = min(max_seq_len, self.sliding_window)
        return choose_decode_splits(num_decodes, self.num_kv_heads, max_seq_len, self._sm_count(device),
                                    self.max_decode_splits)

    def _sm_count(self, device: torch.device) -> int:
        if device not in self._num_sms:
            # The interpreter on CPU: pretend to a small GPU so that long sequences still split.
            self._num_sms[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                                     if device.type == "cuda" else 4)
        return self._num_sms[device]

    def _prefill_work(self, meta: AttentionMetadata, device: torch.device) -> torch.Tensor:
        if self._work_meta is not meta or self._work is None:
            starts = meta.query_start_loc_list
            query_lens = [b - a for a, b in zip(starts, starts[1:])]
            work = prefill_work_list(query_lens, meta.prefill_indices, self.prefill_block_q)
            self._work = torch.tensor(work, dtype=torch.int32, device=device)  # [2, num_programs]
            self._work_meta = meta
        return self._work
