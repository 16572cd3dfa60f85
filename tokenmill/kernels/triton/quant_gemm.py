"""Weight-only quantized GEMMs in Triton (W4A16 / W8A16), reading AWQ and GPTQ checkpoint layouts as stored.

    y[m, n] = sum_k x[m, k] * (q[k, n] - z[g(k), n]) * s[g(k), n]        (+ bias[n])

with g(k) = k // group_size, or g_idx[k] for GPTQ's act-order (desc_act) checkpoints, whose input channels
are grouped in a permuted order. Each program dequantizes a [BLOCK_K, BLOCK_N] tile of the weight in
registers and feeds it to tl.dot, so the weight crosses memory once, packed (4 or 8 bits per element).

Layouts (K = in_features, N = out_features, G = number of groups):
  "awq"   qweight int32 [K, N/8]: 8 nibbles along N, column j of a word in nibble (j % 2) * 4 + j // 2 (the
          interleaved order 0,2,4,6,1,3,5,7); qzeros int32 [G, N/8] packed the same way; scales [G, N].
  "gptq"  qweight int32 [K * bits / 32, N]: packed along K in order; qzeros int32 [G, N * bits / 32] packed
          along N in order, holding zero - zero_offset (GPTQ v1 stores zero - 1: zero_offset=1); scales
          [G, N]; qzeros None means a symmetric layout without stored zeros (zero = 2^(bits-1)).
          bits 4 or 8. compressed-tensors pack-quantized weights are this layout transposed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.attention.triton.paged_attention import interpreting

LAYOUTS = ("awq", "gptq")


@triton.jit
def _quant_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, bias_ptr, out_ptr,
    M, N, K, group_size,
    stride_xm, stride_om, stride_qw, stride_s, stride_qz,
    BITS: tl.constexpr, AWQ: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if AWQ:
        col_shift = ((rn % 2) * 4 + (rn % 8) // 2) * 4  # [BLOCK_N]: nibble of column n in its word
        zero_col = rn // 8  # qzeros word of column n
    else:
        col_shift = (rn % PACK) * BITS  # of the zero point of column n in its qzeros word
        zero_col = rn // PACK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        tile_mask = mask_k[:, None] & mask_n[None, :]
        if AWQ:
            words = tl.load(qweight_ptr + rk[:, None].to(tl.int64) * stride_qw + (rn // 8)[None, :],
                            mask=tile_mask, other=0)
            q = (words >> col_shift[None, :]) & MASK
        else:
            words = tl.load(qweight_ptr + (rk // PACK)[:, None].to(tl.int64) * stride_qw + rn[None, :],
                            mask=tile_mask, other=0)
            q = (words >> ((rk % PACK) * BITS)[:, None]) & MASK
        if GROUP_ALIGNED:
            # The whole K tile lies in one group (BLOCK_K divides group_size): one row of scales and zeros.
            g_row = (k0 // group_size).to(tl.int64)
            s = tl.load(scales_ptr + g_row * stride_s + rn, mask=mask_n, other=0.0)[None, :]
            if HAS_ZEROS:
                zw = tl.load(qzeros_ptr + g_row * stride_qz + zero_col, mask=mask_n, other=0)
                z = (((zw >> col_shift) & MASK) + ZERO_OFFSET)[None, :]
            else:
                z = 1 << (BITS - 1)
        else:
            if HAS_G_IDX:
                g = tl.load(g_idx_ptr + rk, mask=mask_k, other=0)
            else:
                g = rk // group_size
            s = tl.load(scales_ptr + g[:, None].to(tl.int64) * stride_s + rn[None, :], mask=tile_mask, other=0.0)
            if HAS_ZEROS:
                zw = tl.load(qzeros_ptr + g[:, None].to(tl.int64) * stride_qz + zero_col[None, :],
                             mask=tile_mask, other=0)
                z = ((zw >> col_shift[None, :]) & MASK) + ZERO_OFFSET
            else:
                z = 1 << (BITS - 1)
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x.dtype)  # [BLOCK_K, BLOCK_N]
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _dot_in_float32(dtype: torch.dtype) -> bool:
    # float32 activations take IEEE products (tf32 would miss float32 tolerances); under the interpreter every
    # dtype does, since Triton 3.x's interpreter multiplies bfloat16 operands from their raw bits.
    return interpreting() or dtype == torch.float32


def _block_m(m: int) -> int:
    return max(16, min(64, triton.next_power_of_2(m)))


def quant_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    *,
    layout: str,
    bits: int = 4,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    zero_offset: int = 0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (float16, bfloat16 or float32) times the quantized weight in `layout` ("awq" or "gptq", see
    the module docstring): [M, N] in x's dtype. group_size divides K (per-channel: group_size = K);
    g_idx [K] int32 replaces k // group_size (act-order)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if bits not in (4, 8) or (layout == "awq" and bits != 4):
        raise ValueError(f"{layout} weights of {bits} bits are not supported (awq: 4; gptq: 4 or 8)")
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("quant_gemm needs x [M, K] contiguous in its last dimension")
    m, k = x.shape
    pack = 32 // bits
    n = qweight.shape[1] * 8 if layout == "awq" else qweight.shape[1]
    expected_k = qweight.shape[0] if layout == "awq" else qweight.shape[0] * pack
    if expected_k != k:
        raise ValueError(f"x has {k} input features, the {layout} qweight {tuple(qweight.shape)} holds {expected_k}")
    if scales.shape[-1] != n or scales.shape[0] * group_size < k:
        raise ValueError(f"scales {tuple(scales.shape)} do not cover a [{k}, {n}] weight in groups of {group_size}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m = _block_m(m)
    # Narrower column tiles for few rows (decode): more programs to spread the weight read over the SMs.
    block_n = min(64 if m > 16 else 32, max(16, triton.next_power_of_2(n)))
    block_k = 64 if k % 64 == 0 and not interpreting() else 32 if k % 32 == 0 else 16
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_gemm_kernel[grid](
        x, qweight, scales, qzeros if qzeros is not None else qweight, g_idx if g_idx is not None else qweight,
        bias if bias is not None else scales, out,
        m, n, k, group_size,
        x.stride(0), out.stride(0), qweight.stride(0), scales.stride(0),
        qzeros.stride(0) if qzeros is not None else 0,
        BITS=bits, AWQ=layout == "awq", HAS_ZEROS=qzeros is not None, ZERO_OFFSET=zero_offset,
        HAS_G_IDX=g_idx is not None, HAS_BIAS=bias is not None, DOT_F32=_dot_in_float32(x.dtype),
        GROUP_ALIGNED=g_idx is None and group_size % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out
