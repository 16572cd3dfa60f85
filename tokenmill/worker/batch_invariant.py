"""Batch-invariant mode (vLLM's VLLM_BATCH_INVARIANT): a request's numbers do not depend on its batch mates.

Without it, greedy and seeded outputs can change with the batch in bfloat16: a row's logits come out of
reductions whose order depends on the batch (a matmul kernel chosen by the number of rows, a decode attention
that splits few sequences across threads and not many, a prompt cut into other prefill chunks when the token
budget is shared), and where two tokens are within one bfloat16 step of each other, the last bit decides.

With it, every reduction a row goes through has an order fixed by that row alone:

- linear layers run over fixed tiles of ROW_TILE rows (the last one padded with zeros), so each row goes
  through a matmul of the same shape whatever the batch size;
- attention computes every token (prefill chunks included) as a decode of its own over the paged cache, with
  the native CPU kernel and no split of its positions, so how a prompt is chunked changes nothing;
- RMSNorm, rotary embedding, SiLU-and-mul and the sampler already work row by row.

So greedy outputs, and seeded samples, are identical whatever else is in the batch, however the prompt is
chunked, with or without prefix caching and preemption. The price is throughput: prefill attention loses its
matmul form and small batches pay for the padded tile (BENCHMARKS.md, "Batch-invariant mode"). The mode runs
on CPU with the native kernels; elsewhere the engine refuses it with a message.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

# Rows per matmul call. A multiple of the kernels' register blocking, and small enough that a decode batch
# of a few sequences does not pay much for padding.
ROW_TILE = 16


class RowTiledLinear(nn.Module):
    """A linear layer applied to fixed tiles of ROW_TILE rows: the same kernel, with the same reduction order,
    for every row whatever the number of rows."""

    def __init__(self, inner: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.inner = inner
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        n = rows.shape[0]
        padded = -(-n // ROW_TILE) * ROW_TILE
        if padded != n:
            rows = torch.cat((rows, rows.new_zeros(padded - n, self.in_features)))
        else:
            rows = rows.contiguous()
        out = torch.cat([self.inner(rows[i : i + ROW_TILE]) for i in range(0, padded, ROW_TILE)])
        return out[:n].view(*x.shape[:-1], self.out_features)


def tile_linear_rows(model: nn.Module) -> int:
    """Wrap every linear layer of the model (plain or pre-packed) in a RowTiledLinear; returns how many."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if hasattr(child, "in_features") and hasattr(child, "out_features")
               and not getattr(child, "is_embedding", False)
               and not isinstance(child, RowTiledLinear) and not isinstance(parent, RowTiledLinear)]
    for parent, name, child in targets:
        in_features, out_features = cast(tuple[int, int], (child.in_features, child.out_features))
        setattr(parent, name, RowTiledLinear(child, in_features, out_features))
    return len(targets)
