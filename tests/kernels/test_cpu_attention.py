"""The native CPU decode kernel equals the PyTorch reference attention."""

from __future__ import annotations

import pytest
import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.kernels.cpu import ops as cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.load_library() is None, reason="no C compiler for the CPU kernel")


def decode_meta(seq_lens: torch.Tensor, block_tables: torch.Tensor) -> AttentionMetadata:
    n = len(seq_lens)
    return AttentionMetadata(
        num_tokens=n, num_seqs=n, query_start_loc=torch.arange(n + 1, dtype=torch.int32), seq_lens=seq_lens,
        block_tables=block_tables, slot_mapping=torch.zeros(n, dtype=torch.long), max_query_len=1,
        max_seq_len=int(seq_lens.max()), query_start_loc_list=list(range(n + 1)), seq_lens_list=seq_lens.tolist(),
        prefill_indices=[], decode_indices=list(range(n)), decode_rows=torch.arange(n),
        decode_seq_lens=seq_lens, decode_block_tables=block_tables, max_decode_seq_len=int(seq_lens.max()),
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 2, 48)])
@pytest.mark.parametrize("window", [None, 37])
# 1 thread: one task per sequence (all its KV heads); 8 threads for 11 sequences: one task per KV head.
@pytest.mark.parametrize("num_threads", [1, 8])
def test_decode_kernel_matches_reference(dtype, tol, num_heads, num_kv_heads, head_dim, window, num_threads):
    g = torch.Generator().manual_seed(0)
    block_size, num_blocks, num_seqs = 16, 300, 11
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    seq_lens = torch.randint(1, 200, (num_seqs,), generator=g, dtype=torch.int32)
    seq_lens[0] = 1
    max_blocks = -(-int(seq_lens.max()) // block_size)
    tables = torch.randperm(num_blocks, generator=g)[: num_seqs * max_blocks].view(num_seqs, max_blocks).int()
    q = torch.randn(num_seqs, num_heads, head_dim, generator=g).to(dtype)
    scale = head_dim**-0.5
    got = cpu_kernels.paged_decode_attention(q, kv_cache, tables, seq_lens, scale, window, num_threads)
    # Reference in float32 on the same (rounded) inputs.
    ref_backend = TorchAttentionBackend(num_heads, num_kv_heads, head_dim, scale, window)
    expected = torch.empty(q.shape, dtype=torch.float32)
    ref_backend._decode(q.float(), kv_cache.float(), decode_meta(seq_lens, tables), expected)
    err = (got.float() - expected).abs().max() / expected.abs().max()
    assert err < tol


def test_decode_kernel_writes_into_out_view():
    g = torch.Generator().manual_seed(1)
    kv_cache = torch.randn(2, 20, 16, 2, 64, generator=g).to(torch.bfloat16)
    tables = torch.arange(20, dtype=torch.int32).view(4, 5)
    seq_lens = torch.tensor([5, 80, 33, 64], dtype=torch.int32)
    q = torch.randn(4, 4, 64, generator=g).to(torch.bfloat16)
    out = torch.zeros(6, 4, 64, dtype=torch.bfloat16)
    expected = cpu_kernels.paged_decode_attention(q, kv_cache, tables, seq_lens, 0.125, None)
    cpu_kernels.paged_decode_attention(q, kv_cache, tables, seq_lens, 0.125, None, out=out[1:5])
    assert torch.equal(out[1:5], expected)
    assert not out[0].any() and not out[5].any()
    with pytest.raises(ValueError, match="out must be"):
        cpu_kernels.paged_decode_attention(q, kv_cache, tables, seq_lens, 0.125, None, out=out[:3])
