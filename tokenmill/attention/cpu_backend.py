"""CPU attention backend: new keys and values are copied into the cache and decodes read it in place with
native kernels; prefill chunks use PyTorch's SDPA (compute-bound, where the gather is a small share)."""

from __future__ import annotations

import torch

from tokenmill.attention import cpu_kernels
from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend


class CPUAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        cpu_kernels.write_kv(key, value, kv_cache, slot_mapping)

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                out: torch.Tensor) -> None:
        rows = meta.decode_row_slice
        if rows is not None:  # consecutive rows: the kernel reads and writes views, no gather or scatter
            cpu_kernels.paged_decode_attention(query[rows], kv_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                               self.scale, self.sliding_window, out=out[rows])
            return
        out[meta.decode_rows] = cpu_kernels.paged_decode_attention(
            query[meta.decode_rows], kv_cache, meta.decode_block_tables, meta.decode_seq_lens, self.scale,
            self.sliding_window
        )
