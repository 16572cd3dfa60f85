"""Triton W4A16 / W8A16 GEMMs on AWQ and GPTQ layouts against x @ the reference dequantization (under
TRITON_INTERPRET=1 on CPU; shapes kept small, the interpreter is slow)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: `pip install triton` runs these kernels on CPU")

from tests.quant_checkpoints import (  # noqa: E402
    AWQ_ORDER,
    pack_rows,
    quantize_groups,
    read_awq,
    read_gptq,
)
from tokenmill.kernels.triton.quant_gemm import quant_gemm  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


def _check(out: torch.Tensor, x: torch.Tensor, w_ref: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    ref = x.float() @ w_ref.T + (bias.float() if bias is not None else 0)
    tol = TOL[x.dtype]
    assert out.dtype == x.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 19])
def test_awq_layout(m, dtype):
    n, k, group = 48, 96, 32
    q, scales, zeros = quantize_groups(_weights(n, k, 0), 4, torch.arange(k) // group, k // group, sym=False)
    qweight, qzeros = pack_rows(q.T, 4, AWQ_ORDER), pack_rows(zeros.T, 4, AWQ_ORDER)
    w_ref = read_awq(qweight, qzeros, scales.T.contiguous(), group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(n).to(dtype)
    out = quant_gemm(x, qweight, scales.T.contiguous().to(dtype), qzeros, layout="awq", group_size=group, bias=bias)
    _check(out, x, w_ref, bias)


# Groups of 32 fill a K tile (one row of scales per tile); groups of 16 are looked up per input channel, as
# act-order's g_idx is.
@pytest.mark.parametrize("bits,sym,act_order,group", [(4, True, False, 32), (4, False, True, 32),
                                                      (8, True, True, 32), (8, False, False, 32),
                                                      (4, False, False, 16)])
def test_gptq_layout(bits, sym, act_order, group):
    n, k, m = 40, 128, 5
    gen = torch.Generator().manual_seed(2)
    g_idx = (torch.arange(k) // group).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)].contiguous()
    q, scales, zeros = quantize_groups(_weights(n, k, 3), bits, g_idx, k // group, sym=sym, min_zero=1)
    qweight = pack_rows(q, bits).T.contiguous()
    qzeros = pack_rows((zeros - 1).T, bits)
    w_ref = read_gptq(qweight, qzeros, scales.T.contiguous(), g_idx, bits)
    x = torch.randn(m, k, generator=gen)
    out = quant_gemm(x, qweight, scales.T.contiguous().float(), qzeros, layout="gptq", bits=bits,
                     group_size=group, g_idx=g_idx if act_order else None, zero_offset=1)
    _check(out, x, w_ref)


def test_symmetric_without_stored_zeros_per_channel():
    """compressed-tensors W8A16 per channel: packed along K, no zero points (2^(bits-1)), one group."""
    n, k, m = 24, 64, 3
    q, scales, _ = quantize_groups(_weights(n, k, 4), 8, torch.zeros(k, dtype=torch.int32), 1, sym=True)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5))
    out = quant_gemm(x, pack_rows(q, 8).T.contiguous(), scales.T.contiguous().float(), None, layout="gptq",
                     bits=8, group_size=k)
    _check(out, x, (q - 128).float() * scales.float())


def test_rejects_mismatched_shapes_and_layouts():
    qweight = torch.zeros(64, 2, dtype=torch.int32)
    scales = torch.ones(2, 16)
    with pytest.raises(ValueError, match="input features"):
        quant_gemm(torch.zeros(1, 32), qweight, scales, None, layout="awq", group_size=32)
    with pytest.raises(ValueError, match="not supported"):
        quant_gemm(torch.zeros(1, 64), qweight, scales, None, layout="awq", bits=8, group_size=32)
    with pytest.raises(ValueError, match="layout"):
        quant_gemm(torch.zeros(1, 64), qweight, scales, None, layout="marlin", group_size=32)
