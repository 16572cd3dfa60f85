"""Fused Triton kernels for the elementwise work around attention, for the model on CUDA.

In eager PyTorch one RMSNorm is 8 kernels, the rotary embedding of q and k 20, SiLU-and-multiply 2: a Llama
layer launches about 45 kernels, 1400 per step for Llama-3.1-8B. At decode batch 1 each runs for a couple
of microseconds even inside a CUDA graph, about 3 ms on top of a 5.3 ms weight read. These kernels do each
of those stages in one launch, with the same float32 arithmetic and the same roundings as the PyTorch code
in tokenmill/model/llama.py, so the outputs match it (bitwise in float32 up to fused multiply-adds).

    rms_norm(x, weight, eps, residual=None)   weight * (x / rms(x)), float32 inside; with residual: residual
                                              += x in place first and the sum is normalised (vLLM's
                                              fused_add_rms_norm)
    rotary_embedding_(q, k, positions, cos, sin)  rotate-half RoPE of q and k in place
    silu_and_mul(gate_up)                     silu(gate) * up of [tokens, 2 * intermediate]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr,
    stride_x, stride_r, stride_o, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # x + residual rounded to the activation dtype, as the eager residual add stores it.
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of x [num_tokens, hidden]; with residual, residual <- x + residual first (in place) and the
    sum is normalised. Returns a new tensor."""
    num_tokens, hidden = x.shape
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rms_norm needs rows contiguous in their last dimension")
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x, residual if residual is not None else x, weight, out,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )
    return out


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_table,
    num_q_heads, num_k_heads, half,
    HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    is_k = tl.program_id(1)  # 0: rotate q's heads, 1: k's
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    h = tl.arange(0, HEADS_PAD)
    cos = tl.load(cos_ptr + pos * stride_table + i, mask=i < half, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_table + i, mask=i < half, other=0.0)[None, :]
    if is_k == 0:
        base = q_ptr + tok * stride_q_tok + h[:, None] * stride_q_head
        mask = (h[:, None] < num_q_heads) & (i[None, :] < half)
    else:
        base = k_ptr + tok * stride_k_tok + h[:, None] * stride_k_head
        mask = (h[:, None] < num_k_heads) & (i[None, :] < half)
    x1 = tl.load(base + i[None, :], mask=mask, other=0.0)
    x2 = tl.load(base + half + i[None, :], mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    tl.store(base + i[None, :], (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(base + half + i[None, :], (x2 * cos + x1 * sin).to(dtype), mask=mask)


def rotary_embedding_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> None:
    """Rotate-half RoPE in place: q [num_tokens, num_heads, head_dim], k [num_tokens, num_kv_heads, head_dim]
    (strided views of the qkv projection are fine); cos, sin [max_positions, head_dim / 2] float32."""
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rotary_embedding_ needs q, k, cos and sin contiguous in their last dimension")
    half = head_dim // 2
    _rotary_kernel[(num_tokens, 2)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        num_q_heads, k.shape[1], half,
        HEADS_PAD=triton.next_power_of_2(max(num_q_heads, k.shape[1])), HALF_PAD=triton.next_power_of_2(half),
        num_warps=4,
    )


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # silu rounded to the activation dtype first, as F.silu(gate) * up rounds it.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [num_tokens, 2 * intermediate] (gate first, as the fused projection)."""
    num_tokens, double = gate_up.shape
    inter = double // 2
    out = torch.empty((num_tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0:
        return out
    if gate_up.stride(-1) != 1:
        raise ValueError("silu_and_mul needs gate_up contiguous in its last dimension")
    block = min(2048, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4,
    )
    return out
