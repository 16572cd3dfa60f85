"""AWQ checkpoints (AutoAWQ / llm-awq, the GEMM layout): 4-bit, group-wise, with zero points.

Tensors of one linear layer (K = in_features, N = out_features, G = K / group_size):
    qweight  int32 [K, N / 8]   eight 4-bit values along N per word, in AWQ's interleaved order: the word's
                                nibble i (bits [4i, 4i+4)) holds column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]
    qzeros   int32 [G, N / 8]   zero points, packed the same way
    scales   fp16  [G, N]
    w[n, k] = (q[k, n] - zero[k // group_size, n]) * scales[k // group_size, n]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from tokenmill.model.quantization.base import LinearMethod, QuantizationConfig, register_quantization_config
from tokenmill.model.quantization.unquantized import UnquantizedLinearMethod
from tokenmill.model.quantization.weight_only import (
    GROUPS,
    CanonicalWeight,
    WeightOnlyIntMethod,
    check_scales,
    check_tensor,
    is_decoder_linear,
    unpack_int32,
)

SUPPORTED_GROUP_SIZES = (32, 64, 128)
# Column j (0..7) of a word sits in nibble AWQ_NIBBLE[j]: the inverse of the packing order 0,2,4,6,1,3,5,7.
AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [R, C * 8] of an AWQ-packed int32 [R, C], columns in their natural order."""
    nibbles = unpack_int32(packed, 4, 1)  # [R, C * 8], nibble order within each word
    r, c = packed.shape
    return nibbles.view(r, c, 8)[:, :, list(AWQ_NIBBLE)].reshape(r, c * 8)


def awq_to_canonical(prefix: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     group_size: int) -> CanonicalWeight:
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if k % group_size:
        raise ValueError(f"{prefix}: group_size {group_size} does not divide the {k} input features")
    num_groups = k // group_size
    check_tensor(f"{prefix}.qweight", qweight, torch.int32, (k, n // 8))
    check_tensor(f"{prefix}.qzeros", qzeros, torch.int32, (num_groups, n // 8))
    check_tensor(f"{prefix}.scales", scales, (torch.float16, torch.bfloat16, torch.float32), (num_groups, n))
    check_scales(f"{prefix}.scales", scales)
    q = unpack_awq(qweight).T.contiguous()  # [N, K]
    zeros = unpack_awq(qzeros).T.contiguous()  # [N, G]
    return CanonicalWeight(q, scales.T.contiguous(), zeros, group_size, 4)


class AWQLinearMethod(WeightOnlyIntMethod):
    def __init__(self, prefix: str, shard_prefixes: Sequence[str], group_size: int,
                 backend: str | None = None) -> None:
        super().__init__(prefix, shard_prefixes, 4, group_size, backend)
        self.symmetric = False  # AWQ stores a zero point per group

    def split_layout(self, name: str) -> dict[str, tuple[int, int]]:
        # qweight [K, N/8] and qzeros [G, N/8] pack 8 outputs per int32 (interleaved within the word only, so
        # whole words split cleanly); scales [G, N].
        return {"qweight": {"output": (1, 8), "input": (0, 1)}, "qzeros": {"output": (1, 8), "input": (0, GROUPS)},
                "scales": {"output": (1, 1), "input": (0, GROUPS)}}.get(name, {})

    def output_pack(self) -> int:
        return 8

    def checkpoint_bytes(self, in_features: int, out_features: int, group: int) -> int:
        num_groups = in_features // group
        return (in_features * out_features // 2 + num_groups * out_features * 2
                + num_groups * out_features // 2)  # qweight, fp16 scales, qzeros

    def register(self, layer: Any, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> None:
        if in_features % self.group_size:
            raise ValueError(f"{self.prefix}: AWQ group_size {self.group_size} does not divide its {in_features} "
                             "input features: the checkpoint does not match config.json")
        for shard, rows in zip(self.shard_prefixes, output_sizes, strict=False):
            if rows % 8:
                raise ValueError(f"{shard}: {rows} output features cannot be packed 8 to an int32 (AWQ)")
        n, num_groups = sum(output_sizes), in_features // self.group_size
        self.param(layer, "qweight", (in_features, n // 8), torch.int32, output_sizes, output_dim=1, pack_factor=8)
        self.param(layer, "qzeros", (num_groups, n // 8), torch.int32, output_sizes, output_dim=1, pack_factor=8)
        self.param(layer, "scales", (num_groups, n), torch.float16, output_sizes, output_dim=1)

    def to_canonical(self, layer: Any) -> CanonicalWeight:
        return awq_to_canonical(self.prefix, layer.qweight.data, layer.qzeros.data, layer.scales.data,
                                self.group_size)

    def triton_args(self, layer: Any) -> dict[str, Any]:
        return {"qweight": layer.qweight.data, "scales": layer.scales.data, "qzeros": layer.qzeros.data,
                "layout": "awq", "bits": 4, "group_size": self.group_size}


@register_quantization_config("awq")
class AWQConfig(QuantizationConfig):
    """quantization_config of an AWQ checkpoint: {"quant_method": "awq", "bits": 4, "group_size": g,
    "zero_point": true, "version": "gemm", "modules_to_not_convert": [...]}."""

    def __init__(self, group_size: int = 128, modules_to_not_convert: Sequence[str] = ()) -> None:
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"AWQ group_size={group_size} is not supported: use 32, 64 or 128")
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQConfig:
        bits = int(config.get("bits", config.get("w_bit", 4)))
        if bits != 4:
            raise ValueError(f"AWQ with bits={bits} is not supported: AWQ checkpoints are 4-bit")
        if not config.get("zero_point", True):
            raise ValueError("AWQ with zero_point=false is not supported: tokenmill loads AWQ's zero-point layout")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version={version!r} is not supported: tokenmill loads the GEMM layout "
                             "(version 'gemm'); re-export the model with AutoAWQ's GEMM kernels")
        group = int(config.get("group_size", config.get("q_group_size", 128)))
        return cls(group, config.get("modules_to_not_convert") or ())

    def get_linear_method(self, prefix: str, shard_prefixes: Sequence[str] = ()) -> LinearMethod:
        names = list(shard_prefixes) or [prefix]
        skipped = [n for n in names if any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", n)
                                             for m in self.modules_to_not_convert)]
        if skipped and len(skipped) != len(names):
            raise ValueError(f"{prefix}: modules_to_not_convert leaves {', '.join(skipped)} unquantized but not the "
                             "other parts of the fused layer; tokenmill needs them quantized alike")
        if skipped or not is_decoder_linear(prefix):
            return UnquantizedLinearMethod()
        return AWQLinearMethod(prefix, shard_prefixes, self.group_size)
