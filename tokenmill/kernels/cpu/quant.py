"""Weight-only quantized linear kernels for the CPU: int8 (W8A16) and int4 (W4A16) weights, bf16/f32 activations.

Conventions (every quantization method maps its checkpoint to one of these):
- int8: ``w[n, k] = scales[n, k // group] * q[n, k]`` with q int8 [N, K] and float32 scales [N, K / group]
  (per-channel: group = K). Symmetric only: an int8 format with zero points is rejected by its method.
- int4: ``w[n, k] = (q[n, k] - zeros[n, k // group]) * scales[n, k // group]`` with q in 0..15 (uint8 [N, K]),
  scales [N, K / group] and zeros [N, K / group] (float or integer; None means 8, the symmetric case); or, for
  formats that store a minimum instead of a zero point (GGUF Q4_1, Q4_K), ``w = q * scales + bias`` with
  bias [N, K / group]. Groups of 32, 64, 128 or 256 along K.

Which kernel runs depends on the number of activation rows M, chosen per call from thresholds measured on this
CPU (benchmarks/quant_kernels.py, BENCHMARKS.md):
- M <= max_packed_rows (decode): the packed kernel streams the quantized bytes: torch's
  _weight_int4pack_mm_for_cpu for int4, tokenmill's int8_gemm (csrc/quant.c) for int8;
- larger M (prefill, big decode batches): the weight is dequantized to the activation dtype, then one dense matmul
  (oneDNN's AVX512-BF16 GEMM), since there the arithmetic, not the bytes, bounds the time.

Precision kept: int8 scales are float32, so GGUF Q8_0 / Q6_K weights are exact. The int4 kernel takes its scales
and zero offsets in the activation dtype: in bfloat16 they keep 8 significant bits (relative error <= 2^-9 per
group scale; GGUF stores float16 with 11), in float32 they are exact.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import ops

INT4_GROUP_SIZES = (32, 64, 128, 256)
# Rows up to which the packed kernels beat dequantize + dense GEMM on this CPU (AVX512-BF16, no AMX), measured
# by benchmarks/quant_kernels.py on the bundled model's shapes (BENCHMARKS.md, "Quantized linear kernels").
INT4_MAX_PACKED_ROWS = 4
INT8_MAX_PACKED_ROWS = 4
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


@functools.cache
def _native() -> bool:
    return ops.load_library() is not None


class Int8Weight:
    """An int8 weight with group scales, ready for matmul: see the module docstring for the convention."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, group: int) -> None:
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"int8 weight must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
        n, k = q.shape
        if group <= 0 or k % group or group % 16:
            raise ValueError(f"int8 group size {group} must be a multiple of 16 dividing in_features={k}")
        if tuple(scales.shape) != (n, k // group):
            raise ValueError(f"int8 scales have shape {tuple(scales.shape)}, expected {(n, k // group)}")
        self.q = q.contiguous()
        self.scales = scales.to(torch.float32).contiguous()
        self.group = group
        self.out_features, self.in_features = n, k

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.scales]

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight [N, K] in dtype."""
        if dtype == torch.bfloat16 and _native():
            w = torch.empty(self.q.shape, dtype=torch.bfloat16)
            ops._library().int8_dequant_bf16(self.q.data_ptr(), self.scales.data_ptr(), self.group, w.data_ptr(),
                                             self.out_features, self.in_features, torch.get_num_threads())
            return w
        scales = self.scales.repeat_interleave(self.group, dim=1)
        return (self.q.to(torch.float32) * scales).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows ids of the weight [len(ids), K] (an embedding lookup)."""
        q = self.q[ids].to(torch.float32)
        return (q * self.scales[ids].repeat_interleave(self.group, dim=-1)).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] @ w.T -> [..., N] in x's dtype."""
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        if m <= INT8_MAX_PACKED_ROWS and x2.dtype in _DTYPE_CODES and x2.device.type == "cpu" and _native():
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            out = torch.empty((m, self.out_features), dtype=x2.dtype)
            status = ops._library().int8_gemm(
                x2.data_ptr(), _DTYPE_CODES[x2.dtype], x2.stride(0), self.q.data_ptr(), self.scales.data_ptr(),
                self.group, out.data_ptr(), out.stride(0), m, self.out_features, self.in_features,
                torch.get_num_threads())
            if status != 0:
                raise MemoryError(f"int8_gemm could not allocate {m * self.in_features * 4} bytes")
        else:
            out = F.linear(x2, self.dequantize(x2.dtype))
        return out.view(*x.shape[:-1], self.out_features)


class Int4Weight:
    """An int4 group-quantized weight in torch's CPU int4pack layout: see the module docstring."""

    def __init__(self, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int, out_features: int,
                 in_features: int) -> None:
        self.packed = packed  # uint8, rows padded to a multiple of 64
        self.scale_zeros = scale_zeros  # [K / group, N_padded, 2]: scale, then the value of q = 8
        self.group = group
        self.out_features, self.in_features = out_features, in_features
        self.padded_out_features = scale_zeros.shape[1]

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zeros.nbytes

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scale_zeros]

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight [N, K] in dtype."""
        sz = self.scale_zeros
        n, k = self.padded_out_features, self.in_features
        if sz.dtype in _DTYPE_CODES and _native():
            w = torch.empty((n, k), dtype=sz.dtype)
            ops._library().int4pack_dequant(self.packed.data_ptr(), sz.data_ptr(), _DTYPE_CODES[sz.dtype],
                                            self.group, w.data_ptr(), n, k, torch.get_num_threads())
        else:
            w = self._dequantize_torch()
        return w[: self.out_features].to(dtype)

    def _dequantize_torch(self) -> torch.Tensor:
        n, k = self.padded_out_features, self.in_features
        blocks = self.packed.reshape(n // 64, k, 32)
        q = torch.cat((blocks & 15, blocks >> 4), dim=2)  # [N / 64, K, 64]
        q = q.permute(0, 2, 1).reshape(n, k).to(torch.float32)
        scales = self.scale_zeros[..., 0].float().T.repeat_interleave(self.group, dim=1)
        offsets = self.scale_zeros[..., 1].float().T.repeat_interleave(self.group, dim=1)
        return (q - 8) * scales + offsets

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] @ w.T -> [..., N] in x's dtype."""
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= INT4_MAX_PACKED_ROWS and x2.dtype == self.scale_zeros.dtype:
            out = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group, self.scale_zeros)
            if self.padded_out_features != self.out_features:
                out = out[:, : self.out_features]
        else:
            out = F.linear(x2, self.dequantize(x2.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)


def pack_int8(q: torch.Tensor, scales: torch.Tensor, group: int | None = None) -> Int8Weight:
    """An int8 weight: q int8 [N, K], scales [N] (per channel) or [N, K / group]; w = scales * q."""
    if scales.dim() == 1:
        scales = scales.reshape(-1, 1)
        group = q.shape[1]
    if group is None:
        group = q.shape[1] // scales.shape[1]
    return Int8Weight(q, scales, group)


def pack_int4(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group: int,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Int4Weight:
    """An int4 weight for activations of `dtype` (bfloat16 or float32).

    q: uint8 [N, K] with values 0..15; scales [N, K / group]; zeros [N, K / group] (None: 8, symmetric):
    w = (q - zeros) * scales. Or, instead of zeros, bias [N, K / group]: w = q * scales + bias.
    """
    if q.dim() != 2:
        raise ValueError(f"int4 weight must be 2-D [out_features, in_features], got {tuple(q.shape)}")
    n, k = q.shape
    if group not in INT4_GROUP_SIZES or k % group:
        raise ValueError(f"int4 group size {group} is not supported for in_features={k}: use one of "
                         f"{INT4_GROUP_SIZES} dividing in_features")
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"int4 weights run with bfloat16 or float32 activations, not {dtype}")
    num_groups = k // group
    for name, t in (("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n, num_groups):
            raise ValueError(f"int4 {name} have shape {tuple(t.shape)}, expected {(n, num_groups)}")
    if zeros is not None and bias is not None:
        raise ValueError("pass zeros or bias for an int4 weight, not both")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("int4 values must lie in 0..15")
    scales = scales.to(torch.float32)
    if bias is not None:
        offsets = bias.to(torch.float32) + 8 * scales  # the value of q = 8
    elif zeros is not None:
        offsets = (8 - zeros.to(torch.float32)) * scales
    else:
        offsets = torch.zeros_like(scales)
    padded = -n % 64  # the layout packs rows in blocks of 64
    q32 = q.to(torch.int32)
    if padded:
        q32 = F.pad(q32, (0, 0, 0, padded), value=8)
        scales = F.pad(scales, (0, 0, 0, padded))
        offsets = F.pad(offsets, (0, 0, 0, padded))
    packed = torch._convert_weight_to_int4pack_for_cpu(q32.contiguous(), 1)
    scale_zeros = torch.stack((scales.T, offsets.T), dim=-1).to(dtype).contiguous()  # [K / group, N, 2]
    return Int4Weight(packed, scale_zeros, group, n, k)
