"""Fused layer kernels against the model's PyTorch code, under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: `pip install triton` runs these kernels on CPU")

from tokenmill.attention.triton.layer_ops import rms_norm, rotary_embedding_, silu_and_mul  # noqa: E402
from tokenmill.model.llama import RMSNorm, _rotate  # noqa: E402

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    # Same float32 arithmetic and roundings: about one ulp of the output dtype apart (the interpreter of
    # Triton 3.x truncates float32 -> bfloat16 where the GPU rounds to nearest).
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[ref.dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@DTYPES
def test_rms_norm(dtype):
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, 1e-6)
    norm.weight.data = torch.randn(48, generator=gen)
    norm = norm.to(dtype)
    x = torch.randn(5, 48, generator=gen).to(dtype)
    assert_matches(rms_norm(x, norm.weight, norm.eps), norm._norm(x))


@DTYPES
def test_rms_norm_with_residual(dtype):
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(40, 1e-5).to(dtype)
    x = torch.randn(3, 40, generator=gen).to(dtype)
    residual = torch.randn(3, 40, generator=gen).to(dtype)
    expected_sum = x + residual
    out = rms_norm(x, norm.weight, norm.eps, residual=residual)
    assert_matches(residual, expected_sum)
    assert_matches(out, norm._norm(expected_sum))


@DTYPES
def test_rotary_in_place_on_qkv_views(dtype):
    gen = torch.Generator().manual_seed(2)
    num_heads, num_kv_heads, head_dim, max_pos = 4, 2, 16, 64
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), torch.rand(head_dim // 2, generator=gen))
    cos, sin = freqs.cos(), freqs.sin()
    qkv = torch.randn(6, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.view(6, num_heads, head_dim), k.view(6, num_kv_heads, head_dim)
    positions = torch.tensor([0, 5, 63, 7, 7, 30])
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    q_ref, k_ref, v_before = _rotate(q, c, s), _rotate(k, c, s), v.clone()
    rotary_embedding_(q, k, positions, cos, sin)
    assert_matches(q, q_ref)
    assert_matches(k, k_ref)
    assert torch.equal(v, v_before)


@DTYPES
def test_silu_and_mul(dtype):
    gen = torch.Generator().manual_seed(3)
    gate_up = torch.randn(4, 2 * 24, generator=gen).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_matches(silu_and_mul(gate_up), F.silu(gate) * up)
