"""CPU attention backend: new keys and values are copied into the cache and decodes read it in place with
native kernels; prefill chunks use PyTorch's SDPA (compute-bound, where the gather is a small share).

Batch-invariant (tokenmill/worker/batch_invariant.py): every token, prefill chunks included, is a decode of its
own over the cache, never split across threads, so its result depends neither on the batch nor on chunking."""

from __future__ import annotations

import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.kernels.cpu import ops as cpu_kernels


class CPUAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, batch_invariant: bool = False) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, sliding_window)
        self.batch_invariant = batch_invariant

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
        if not self.batch_invariant:
            return super().attend(query, key, value, kv_cache, meta)
        tables, seq_lens = self._per_token(meta)
        return cpu_kernels.paged_decode_attention(query, kv_cache, tables, seq_lens, self.scale,
                                                  self.sliding_window, allow_split=False)

    @staticmethod
    def _per_token(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(block table, length up to and including itself) of every token of the step: each token as the
        decode of its own sequence. Built once per step, shared by the layers."""
        cached = meta.backend_cache.get("per_token")
        if cached is None:
            owners: list[int] = []
            lens: list[int] = []
            starts, seq_lens = meta.query_start_loc_list, meta.seq_lens_list
            for i in range(meta.num_seqs):
                n = starts[i + 1] - starts[i]
                owners.extend([i] * n)
                lens.extend(range(seq_lens[i] - n + 1, seq_lens[i] + 1))
            device = meta.block_tables.device
            tables = meta.block_tables.index_select(0, torch.tensor(owners, device=device))
            cached = meta.backend_cache["per_token"] = (tables, torch.tensor(lens, dtype=torch.int32, device=device))
        return cached

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        cpu_kernels.write_kv(key, value, kv_cache, slot_mapping)

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                out: torch.Tensor) -> None:
        tables, seq_lens = meta.decode_block_tables, meta.decode_seq_lens
        assert tables is not None and seq_lens is not None  # AttentionMetadata.build sets them for decodes
        rows = meta.decode_row_slice
        if rows is not None:  # consecutive rows: the kernel reads and writes views, no gather or scatter
            cpu_kernels.paged_decode_attention(query[rows], kv_cache, tables, seq_lens, self.scale,
                                               self.sliding_window, out=out[rows])
            return
        out[meta.decode_rows] = cpu_kernels.paged_decode_attention(
            query[meta.decode_rows], kv_cache, tables, seq_lens, self.scale, self.sliding_window
        )
