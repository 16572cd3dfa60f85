"""The attention-backend interface: every backend reads and writes the same paged KV cache layout.

KV cache of one layer: a tensor of shape [2, num_blocks, block_size, num_kv_heads, head_dim]; index 0 holds
keys, 1 values. Token t of a request lives in block block_table[t // block_size] at offset t % block_size;
the flat slot of a new token is block_id * block_size + offset (the slot mapping).

A batch is the flat concatenation of every scheduled request's new tokens (no padding): request i owns
query rows query_start_loc[i] : query_start_loc[i + 1], and its new tokens are positions
seq_lens[i] - query_len .. seq_lens[i] - 1 of its sequence. Attention of a new token covers every earlier
token of its own sequence (cached or new) and itself: causal, optionally within a sliding window.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    num_tokens: int
    num_seqs: int
    # [num_seqs + 1] int32, cumulative query lengths starting at 0.
    query_start_loc: torch.Tensor
    # [num_seqs] int32, tokens of each sequence including the new ones.
    seq_lens: torch.Tensor
    # [num_seqs, max_num_blocks] int32, padded with 0.
    block_tables: torch.Tensor
    # [num_tokens] int64, flat cache slot of each new token.
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # The same lengths as Python lists, so CPU backends need no device->host copies.
    query_start_loc_list: list[int]
    seq_lens_list: list[int]
    # Sequences with more than one new token (prefill chunks), and with exactly one (decodes).
    prefill_indices: list[int]
    decode_indices: list[int]
    # The decodes gathered once per step for every layer: query row, sequence length, block table of each.
    decode_rows: torch.Tensor | None = None
    decode_seq_lens: torch.Tensor | None = None
    decode_block_tables: torch.Tensor | None = None
    # Longest decode sequence; None when the step has no decode.
    max_decode_seq_len: int | None = None
    # decode_rows as a slice when they are consecutive (the scheduler puts running decodes first), so
    # backends can read and write them as views instead of gathering and scattering.
    decode_row_slice: slice | None = None
    # Backend-private data derived once per step and reused by every layer (e.g. length buckets).
    backend_cache: dict = field(default_factory=dict)

    @classmethod
    def build(cls, query_start_loc: list[int], seq_lens: list[int], block_tables: torch.Tensor,
              slot_mapping: torch.Tensor,
              to_device: Callable[[list[int], torch.dtype], torch.Tensor] | None = None) -> AttentionMetadata:
        """Everything else derived from the per-sequence query ranges and lengths; tensors go to
        block_tables' device, through `to_device(values, dtype)` when given."""
        if to_device is None:
            device = block_tables.device

            def to_device(values: list[int], dtype: torch.dtype) -> torch.Tensor:
                return torch.tensor(values, dtype=dtype, device=device)

        query_lens = [b - a for a, b in zip(query_start_loc, query_start_loc[1:])]
        decode_indices = [i for i, n in enumerate(query_lens) if n == 1]
        seq_lens_t = to_device(seq_lens, torch.int32)
        meta = cls(
            num_tokens=query_start_loc[-1],
            num_seqs=len(seq_lens),
            query_start_loc=to_device(query_start_loc, torch.int32),
            seq_lens=seq_lens_t,
            block_tables=block_tables,
            slot_mapping=slot_mapping,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_list=query_start_loc,
            seq_lens_list=seq_lens,
            prefill_indices=[i for i, n in enumerate(query_lens) if n != 1],
            decode_indices=decode_indices,
        )
        if decode_indices:
            rows = [query_start_loc[i] for i in decode_indices]
            meta.decode_rows = to_device(rows, torch.long)
            if rows[-1] - rows[0] == len(rows) - 1:
                meta.decode_row_slice = slice(rows[0], rows[-1] + 1)
            first, last = decode_indices[0], decode_indices[-1]
            if last - first == len(decode_indices) - 1:  # consecutive (decodes go first): views, no gather
                meta.decode_seq_lens = seq_lens_t[first : last + 1]
                meta.decode_block_tables = block_tables[first : last + 1]
            else:
                idx = to_device(decode_indices, torch.long)
                meta.decode_seq_lens = seq_lens_t[idx]
                meta.decode_block_tables = block_tables[idx]
            meta.max_decode_seq_len = max(seq_lens[i] for i in decode_indices)
        return meta

class AttentionBackend(ABC):
    """Computes attention over the paged KV cache for the flat batch described by AttentionMetadata."""

    name: str = "abstract"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    @abstractmethod
    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Store key/value [num_tokens, num_kv_heads, head_dim] into kv_cache at slot_mapping."""

    @abstractmethod
    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
        """Attention output [num_tokens, num_heads, head_dim] for query [num_tokens, num_heads, head_dim].

        key/value are this step's new tokens, already written into kv_cache; a backend may use them directly
        for sequences with no cached context.
        """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # Every new token's KV is written before any attention reads the cache: a request may read blocks
        # another request of the same step writes (prefix cache hits registered at allocation).
        self.write_kv(key, value, kv_cache, meta.slot_mapping)
        return self.attend(query, key, value, kv_cache, meta)
