"""Triton kernels over the paged KV cache [2, num_blocks, block_size, num_kv_heads, head_dim].

Three kernels and one reduction, each launched by a plain Python wrapper below:

- ``reshape_and_cache``: one program per new token copies its K and V rows to ``slot_mapping[token]``;
  a negative slot (a padded row of a CUDA-graph batch) is skipped.
- ``paged_decode_attention``: one program per (decode, KV head, split). It loads the query rows of every
  query head that shares the KV head (GQA: the KV tile is read once for the whole group) and walks its share
  of the sequence in tiles of TILE_N tokens, gathering each token's cache row through the block table. With
  more than one split (flash-decoding), each program writes an unnormalised partial output with its running
  max and sum, and ``_decode_reduce_kernel`` merges the splits.
- ``paged_prefill_attention``: one program per (BLOCK_Q query tokens of a prefill chunk, KV head). Its
  BLOCK_Q * GROUP_PAD rows are (token, query head of the group) pairs, so again each KV tile serves the whole
  group. Keys come from the cache (cached prefix and this step's tokens alike, written just before), masked
  causally with the chunk's offset (query i sits at position context_len + i) and by the sliding window.

Softmax runs online in float32 in base 2: scores are multiplied by scale * log2(e) and exponentiated with
exp2, which is the same function as exp(scale * q.k) and cheaper on the GPU.

Every length a kernel needs at run time (seq_lens, query_start_loc, block tables) is read from device
tensors, so one launch replays correctly inside a CUDA graph whatever the lengths are at replay.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1), as in CI."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_in_float32(dtype: torch.dtype) -> bool:
    # The interpreter (Triton 3.x) computes tl.dot of bfloat16 operands from their raw bits, so under it
    # operands are upcast first; float32 models take the same path on the GPU, with IEEE products (tf32 would
    # miss the 1e-4 float32 bound).
    return interpreting() or dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------
# Writing new keys and values into the cache
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, cache_ptr, slot_mapping_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_kv, stride_c_block, stride_c_slot, stride_c_head,
    num_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, HEADS_PAD)[:, None]
        dims = tl.arange(0, DIM_PAD)[None, :]
        mask = (heads < num_kv_heads) & (dims < head_dim)
        k = tl.load(key_ptr + tok * stride_k_tok + heads * stride_k_head + dims, mask=mask)
        v = tl.load(value_ptr + tok * stride_v_tok + heads * stride_v_head + dims, mask=mask)
        dst = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot + heads * stride_c_head
        tl.store(cache_ptr + dst + dims, k, mask=mask)
        tl.store(cache_ptr + stride_c_kv + dst + dims, v, mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """kv_cache[0/1] at slot_mapping[t] <- key/value[t]; key, value [num_tokens, num_kv_heads, head_dim]."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _check_last_dim_contiguous(key=key, value=value, kv_cache=kv_cache)
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        num_kv_heads, head_dim,
        BLOCK_SIZE=kv_cache.shape[2], HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        DIM_PAD=triton.next_power_of_2(head_dim),
    )


# ----------------------------------------------------------------------------------------------------------
# Decode: one new token per sequence, split along the sequence
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _paged_decode_kernel(
    q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, rows_ptr,
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    scale_log2,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_bt_seq,
    stride_c_kv, stride_c_block, stride_c_slot, stride_c_head,
    group, head_dim, window,
    BLOCK_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, DIM_PAD: tl.constexpr, TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SLIDING: tl.constexpr, DOT_F32: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    row = tl.load(rows_ptr + seq).to(tl.int64)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    heads = kv_head * group + g  # query heads served by this KV head
    g_mask = g < group
    d_mask = d < head_dim
    q = tl.load(q_ptr + row * stride_q_tok + heads[:, None] * stride_q_head + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [GROUP_PAD, DIM_PAD]
    if DOT_F32:
        q = q.to(tl.float32)

    # This split's share of the keys [start, seq_len), in whole tiles.
    start = 0
    if SLIDING:
        start = tl.maximum(seq_len - window, 0)
    num_tiles = tl.cdiv(seq_len - start, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    lo = start + split * tiles_per_split * TILE_N
    hi = tl.minimum(lo + tiles_per_split * TILE_N, seq_len)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    for tile_start in range(lo, hi, TILE_N):
        pos = tile_start + tl.arange(0, TILE_N)
        valid = pos < hi
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offs = block * stride_c_block + (pos % BLOCK_SIZE) * stride_c_slot + kv_head * stride_c_head
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [TILE_N, DIM_PAD]
        v = tl.load(cache_ptr + stride_c_kv + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))  # [GROUP_PAD, TILE_N]
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # an empty sequence (padding) yields zeros
        tl.store(out_ptr + row * stride_o_tok + heads[:, None] * stride_o_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        # Partials [num_decodes, num_heads, NUM_SPLITS, (DIM_PAD)], contiguous, float32.
        part = (seq.to(tl.int64) * (tl.num_programs(1) * group) + heads) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(part_max_ptr + part, m, mask=g_mask)
        tl.store(part_sum_ptr + part, l_sum, mask=g_mask)
        tl.store(part_out_ptr + part[:, None] * DIM_PAD + d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_max_ptr, part_sum_ptr, rows_ptr, out_ptr,
    stride_o_tok, stride_o_head, head_dim,
    NUM_SPLITS: tl.constexpr, DIM_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(rows_ptr + seq).to(tl.int64)
    part = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, DIM_PAD)
    m = tl.load(part_max_ptr + part)  # [NUM_SPLITS]; -inf for a split that saw no key
    l_sum = tl.load(part_sum_ptr + part)
    acc = tl.load(part_out_ptr + part[:, None] * DIM_PAD + d[None, :])  # [NUM_SPLITS, DIM_PAD]
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_all)
    total = tl.sum(l_sum * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * stride_o_tok + head * stride_o_head + d, out.to(out_ptr.dtype.element_ty),
             mask=d < head_dim)


def paged_decode_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
    num_splits: int,
    sliding_window: int | None = None,
    tile_n: int = 64,
    num_warps: int = 4,
) -> None:
    """out[rows[i]] = attention of query[rows[i]] over the first seq_lens[i] tokens of sequence i's blocks.

    query/out [num_tokens, num_heads, head_dim]; block_tables [num_decodes, >= max blocks] int32;
    seq_lens, rows [num_decodes]. A sequence with seq_len 0 (a padded graph row) gets zeros.
    """
    num_decodes = rows.shape[0]
    if num_decodes == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    _check_last_dim_contiguous(query=query, out=out, kv_cache=kv_cache)
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    dim_pad = max(16, triton.next_power_of_2(head_dim))
    num_splits = triton.next_power_of_2(max(1, num_splits))
    if num_splits > 1:
        part_out = torch.empty((num_decodes, num_heads, num_splits, dim_pad), dtype=torch.float32,
                               device=query.device)
        part_max = torch.empty((num_decodes, num_heads, num_splits), dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = out  # unused
    _paged_decode_kernel[(num_decodes, num_kv_heads, num_splits)](
        query, kv_cache, block_tables, seq_lens, rows,
        out, part_out, part_max, part_sum,
        scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        group, head_dim, sliding_window or 0,
        BLOCK_SIZE=kv_cache.shape[2], GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM_PAD=dim_pad,
        TILE_N=tile_n, NUM_SPLITS=num_splits, SLIDING=sliding_window is not None,
        DOT_F32=_dot_in_float32(query.dtype), num_warps=num_warps,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_decodes, num_heads)](
            part_out, part_max, part_sum, rows, out,
            out.stride(0), out.stride(1), head_dim,
            NUM_SPLITS=num_splits, DIM_PAD=dim_pad, num_warps=4,
        )


# ----------------------------------------------------------------------------------------------------------
# Prefill and chunked prefill: many new tokens per sequence over its cached prefix
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _paged_prefill_kernel(
    q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, work_ptr, out_ptr,
    scale_log2,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_bt_seq,
    stride_c_kv, stride_c_block, stride_c_slot, stride_c_head,
    num_work, group, head_dim, window,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
    TILE_N: tl.constexpr, SLIDING: tl.constexpr, DOT_F32: tl.constexpr,
):
    work = tl.program_id(0)
    kv_head = tl.program_id(1)
    # work list [2, num_work]: the sequence and the first query token (within its chunk) of each program.
    seq = tl.load(work_ptr + work)
    q_first = tl.load(work_ptr + num_work + work)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    r = tl.arange(0, BLOCK_M)
    tok = q_first + r // GROUP_PAD  # query token within the chunk
    g = r % GROUP_PAD
    d = tl.arange(0, DIM_PAD)
    row_mask = (tok < query_len) & (g < group)
    d_mask = d < head_dim
    q_rows = (q_start + tok).to(tl.int64)
    heads = kv_head * group + g
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_tok + heads[:, None] * stride_q_head + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, DIM_PAD]
    if DOT_F32:
        q = q.to(tl.float32)
    q_pos = context_len + tok  # absolute position of each row's token

    last_tok = tl.minimum(q_first + BLOCK_Q, query_len) - 1
    hi = context_len + last_tok + 1  # causal: no key after the last query of this program
    lo = 0
    if SLIDING:
        lo = tl.maximum(context_len + q_first - window + 1, 0)
        lo = (lo // TILE_N) * TILE_N

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    for tile_start in range(lo, hi, TILE_N):
        pos = tile_start + tl.arange(0, TILE_N)
        valid = pos < hi
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offs = block * stride_c_block + (pos % BLOCK_SIZE) * stride_c_slot + kv_head * stride_c_head
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [TILE_N, DIM_PAD]
        v = tl.load(cache_ptr + stride_c_kv + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        allowed = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if SLIDING:
            allowed = allowed & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s * scale_log2, float("-inf"))  # [BLOCK_M, TILE_N]
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row may have seen no allowed key yet (padding rows, or a tile before its window): keep it at 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new

    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_o_tok + heads[:, None] * stride_o_head + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def prefill_block_q(num_heads: int, num_kv_heads: int, block_m: int = 64) -> int:
    """Query tokens per prefill program: BLOCK_Q * GROUP_PAD rows make one tile of block_m rows (or one token's
    GROUP_PAD rows when the group is larger). block_m is a power of two >= 16, as tl.dot needs 16 rows."""
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    group_pad = triton.next_power_of_2(num_heads // num_kv_heads)
    return max(1, block_m // group_pad)


def prefill_work_list(query_lens: list[int], seq_indices: list[int], block_q: int) -> list[list[int]]:
    """[sequences, first query tokens] of the programs that cover every query token of the given sequences."""
    seqs, firsts = [], []
    for i in seq_indices:
        for first in range(0, query_lens[i], block_q):
            seqs.append(i)
            firsts.append(first)
    return [seqs, firsts]


def paged_prefill_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    work: torch.Tensor,
    block_q: int,
    scale: float,
    sliding_window: int | None = None,
    tile_n: int = 64,
    num_warps: int = 4,
) -> None:
    """Attention of the query rows named by ``work`` (int32 [2, num_work], see prefill_work_list) over their
    sequences' cached prefix and new tokens, causal with offset seq_len - query_len."""
    num_work = work.shape[1]
    if num_work == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    _check_last_dim_contiguous(query=query, out=out, kv_cache=kv_cache)
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    group_pad = triton.next_power_of_2(group)
    if block_q * group_pad < 16:
        raise ValueError(f"block_q={block_q} gives {block_q * group_pad} rows; tl.dot needs 16: use prefill_block_q")
    _paged_prefill_kernel[(num_work, num_kv_heads)](
        query, kv_cache, block_tables, seq_lens, query_start_loc, work, out,
        scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        num_work, group, head_dim, sliding_window or 0,
        BLOCK_SIZE=kv_cache.shape[2], BLOCK_Q=block_q, GROUP_PAD=group_pad,
        DIM_PAD=max(16, triton.next_power_of_2(head_dim)), TILE_N=tile_n,
        SLIDING=sliding_window is not None, DOT_F32=_dot_in_float32(query.dtype), num_warps=num_warps,
    )


def _check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)}): "
                             "call .contiguous() first")
