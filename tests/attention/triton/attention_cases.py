"""Random paged-attention batches shaped like the model runner's: mixed decodes and prefill chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.attention.backend import AttentionMetadata


@dataclass
class Case:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim], prefix already cached
    meta: AttentionMetadata


def build_metadata(seqs: list[tuple[int, int]], tables: list[list[int]], block_size: int,
                   device: str = "cpu") -> AttentionMetadata:
    """Metadata for sequences (context_len, query_len) exactly as ModelRunner._build_batch makes it."""
    query_start_loc = [0]
    seq_lens, slots = [], []
    for i, (context_len, query_len) in enumerate(seqs):
        for pos in range(context_len, context_len + query_len):
            slots.append(tables[i][pos // block_size] * block_size + pos % block_size)
        query_start_loc.append(query_start_loc[-1] + query_len)
        seq_lens.append(context_len + query_len)
    width = max(len(t) for t in tables)
    block_tables = torch.zeros((len(seqs), width), dtype=torch.int32, device=device)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return AttentionMetadata.build(query_start_loc, seq_lens, block_tables,
                                   torch.tensor(slots, dtype=torch.int64, device=device))


def make_case(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype, seed: int = 0, device: str = "cpu", spare_blocks: int = 3) -> Case:
    """Every sequence gets its own blocks in a shuffled order; the cache holds random data everywhere (stale
    slots included), so a kernel that reads outside a sequence's tokens fails the comparison."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-(c + q) // block_size) for c, q in seqs]
    num_blocks = sum(needed) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in needed:
        tables.append(order[used : used + n])
        used += n
    meta = build_metadata(seqs, tables, block_size, device)
    num_tokens = meta.num_tokens

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    return Case(
        query=rand(num_tokens, num_heads, head_dim),
        key=rand(num_tokens, num_kv_heads, head_dim),
        value=rand(num_tokens, num_kv_heads, head_dim),
        kv_cache=rand(2, num_blocks, block_size, num_kv_heads, head_dim),
        meta=meta,
    )


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
