"""CPU attention backend: decodes read the paged cache in place with a native kernel; prefill chunks use
PyTorch's SDPA (compute-bound, where the gather is a small share)."""

from __future__ import annotations

import torch

from tokenmill.attention import cpu_kernels
from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend


class CPUAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                out: torch.Tensor) -> None:
        rows = meta.decode_rows
        out[rows] = cpu_kernels.paged_decode_attention(
            query[rows], kv_cache, meta.decode_block_tables, meta.decode_seq_lens, self.scale, self.sliding_window
        )
