"""Triton attention kernels against the PyTorch reference backend, under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: `pip install triton` runs these kernels on CPU")

from tests.attention.triton.attention_cases import make_case, rel_error  # noqa: E402
from tokenmill.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from tokenmill.attention.triton.paged_attention import reshape_and_cache  # noqa: E402
from tokenmill.attention.triton_backend import TritonAttentionBackend, choose_decode_splits  # noqa: E402

# Relative error bounds ||out - ref|| / ||ref|| per dtype.
BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
HEAD_DIM = 32
BLOCK_SIZE = 16

# (context_len, query_len): decodes at several lengths (one at a block boundary), a prefill chunk over a
# cached prefix that ends mid-block, a fresh prompt, and a one-token prompt (scheduled as a decode).
MIXED = [(37, 1), (5, 14), (0, 21), (16, 1), (70, 1), (0, 1), (33, 9)]


def run_both(seqs, num_heads, num_kv_heads, dtype, sliding_window=None, seed=0, **triton_kwargs):
    case = make_case(seqs, num_heads, num_kv_heads, HEAD_DIM, BLOCK_SIZE, dtype, seed=seed)
    args = (num_heads, num_kv_heads, HEAD_DIM, HEAD_DIM**-0.5, sliding_window)
    ref_cache, tri_cache = case.kv_cache.clone(), case.kv_cache.clone()
    ref = TorchAttentionBackend(*args).forward(case.query, case.key, case.value, ref_cache, case.meta)
    out = TritonAttentionBackend(*args, **triton_kwargs).forward(
        case.query, case.key, case.value, tri_cache, case.meta
    )
    assert torch.equal(tri_cache, ref_cache), "write_kv stored different cache contents"
    assert torch.isfinite(out).all()
    return out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2)], ids=["mha", "gqa4"])
def test_mixed_batch_matches_reference(dtype, num_heads, num_kv_heads):
    out, ref = run_both(MIXED, num_heads, num_kv_heads, dtype)
    assert rel_error(out, ref) < BOUNDS[dtype]


def test_group_of_seven():
    # Qwen2.5-0.5B has 14 query heads on 2 KV heads: a group that is not a power of two leaves padded rows.
    out, ref = run_both(MIXED, 7, 1, torch.float32, seed=7)
    assert rel_error(out, ref) < BOUNDS[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sliding_window(dtype):
    # Windows that start mid-block and mid-tile, for decodes and for a chunk longer than the window.
    seqs = [(60, 1), (3, 40), (45, 12), (10, 1)]
    out, ref = run_both(seqs, 8, 2, dtype, sliding_window=24, seed=1)
    assert rel_error(out, ref) < BOUNDS[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_decode_matches_reference(dtype):
    # Four splits: the short sequence leaves some splits empty, the reduce must ignore them.
    seqs = [(300, 1), (20, 1), (129, 1)]
    out, ref = run_both(seqs, 8, 2, dtype, seed=2, decode_num_splits=4)
    assert rel_error(out, ref) < BOUNDS[dtype]


def test_split_decode_with_sliding_window():
    out, ref = run_both([(200, 1), (50, 1)], 4, 1, torch.float32, sliding_window=70, seed=3, decode_num_splits=2)
    assert rel_error(out, ref) < BOUNDS[torch.float32]


def test_reshape_and_cache_skips_negative_slots():
    gen = torch.Generator().manual_seed(4)
    cache = torch.randn(2, 3, BLOCK_SIZE, 2, HEAD_DIM, generator=gen)
    key, value = torch.randn(2, 4, 2, HEAD_DIM, generator=gen).unbind(0)
    slots = torch.tensor([17, -1, 0, 47])
    expected = cache.clone()
    flat = expected.view(2, -1, 2, HEAD_DIM)
    keep = slots >= 0
    flat[0, slots[keep]] = key[keep]
    flat[1, slots[keep]] = value[keep]
    reshape_and_cache(key, value, cache, slots)
    assert torch.equal(cache, expected)


def test_reshape_and_cache_reads_strided_views():
    # The model hands write_kv views of the fused qkv projection: rows are strided, heads are not.
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(3, 4 * HEAD_DIM, generator=gen)
    key = qkv[:, : 2 * HEAD_DIM].view(3, 2, HEAD_DIM)
    value = qkv[:, 2 * HEAD_DIM :].view(3, 2, HEAD_DIM)
    cache = torch.zeros(2, 1, BLOCK_SIZE, 2, HEAD_DIM)
    reshape_and_cache(key, value, cache, torch.tensor([2, 0, 5]))
    assert torch.equal(cache[0, 0, [2, 0, 5]], key)
    assert torch.equal(cache[1, 0, [2, 0, 5]], value)


def test_padded_decode_rows_give_zeros():
    # A CUDA-graph batch padded with seq_len 0 rows: attention of those rows is zero, not NaN.
    case = make_case([(20, 1), (9, 1)], 4, 2, HEAD_DIM, BLOCK_SIZE, torch.float32, seed=6)
    case.meta.decode_seq_lens[1] = 0
    backend = TritonAttentionBackend(4, 2, HEAD_DIM, HEAD_DIM**-0.5)
    for splits in (1, 2):
        backend.decode_num_splits = splits
        out = backend.attend(case.query, case.key, case.value, case.kv_cache, case.meta)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert out[0].abs().sum() > 0


def test_choose_decode_splits():
    # Batch 1, 8 KV heads, 132 SMs: two waves want 33 programs per head, the length allows 16.
    assert choose_decode_splits(1, 8, 4096, 132) == 16
    assert choose_decode_splits(1, 8, 100, 132) == 1
    assert choose_decode_splits(64, 8, 4096, 132) == 1
    assert choose_decode_splits(1, 2, 10**6, 132, max_splits=32) == 32
    for batch in range(1, 300, 7):
        n = choose_decode_splits(batch, 2, 2048, 132)
        assert n & (n - 1) == 0
