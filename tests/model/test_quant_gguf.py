"""GGUF tensors kept quantized: every supported type through tokenmill's kernels equals gguf's own
dequantization times the input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from tokenmill.model.quantization.gguf import GGUF_BLOCKS, gguf_kernel

# type -> byte offsets of its float16 scale fields inside a block (kept finite and small in random blocks)
_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random raw blocks [rows, row_bytes] whose float16 fields hold small finite values."""
    block, nbytes = GGUF_BLOCKS[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    for at in _F16_FIELDS[type_name]:
        raw[..., at:at + 2] = rng.uniform(-0.05, 0.05, size=raw.shape[:2]).astype(np.float16).view(np.uint8) \
            .reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("num_rows", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("type_name", list(GGUF_BLOCKS))
def test_gguf_type_through_kernels_equals_gguf_dequantize(type_name, dtype, num_rows):
    rows, cols = 96, 512
    raw = random_blocks(type_name, rows, cols)
    reference = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols).copy())
    kernel = gguf_kernel(torch.from_numpy(raw), type_name, rows, cols)
    x = torch.randn(num_rows, cols, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = x.double() @ reference.double().T
    got = kernel.matmul(x).double()
    exact = type_name != "Q4_K"  # Q4_K's d * sc products are rounded to float16
    # Relative to sum |x| |w| (the size of the terms summed). float32: summation order only. bfloat16: the
    # activations' and output's rounding (2^-8); Q4_K adds its float16 scales' and offsets' rounding.
    tol = (1e-5 if dtype == torch.float32 else 8e-3) + (0 if exact else 2e-3)
    magnitude = (x.double().abs() @ reference.double().abs().T).max()
    assert (got - expected).abs().max() <= tol * magnitude, type_name
    # The dequantized weight itself (prefill path) and embedding rows: exact but for Q4_K's float16 products.
    weight = kernel.dequantize(torch.float32)
    atol = 0 if exact else 2e-3 * float(reference.abs().max())
    assert torch.allclose(weight, reference, rtol=0, atol=atol), (weight - reference).abs().max()
    ids = torch.tensor([0, 5, 95, 33])
    rows = kernel.rows(ids, torch.float32)
    assert torch.allclose(rows, reference[ids], rtol=0, atol=atol)
