"""Full-precision weights (bfloat16, float16, float32): the default method."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.quantization.base import (
    LinearMethod,
    QuantizationConfig,
    make_param,
    narrow_padded,
    register_quantization_config,
)

if TYPE_CHECKING:
    from tokenmill.model.layers.linear import Linear


@functools.cache
def _onednn_packing_available() -> bool:
    """Whether oneDNN can pre-pack bfloat16 weights here: it needs AVX512 (BW, VL, DQ) or AVX-NE-CONVERT, and
    raises on other CPUs (x86-64-v3), where the plain weight and F.linear serve."""
    if not (hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()):
        return False
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return supported is None or bool(supported())


class UnquantizedLinearMethod(LinearMethod):
    """weight [out_features, in_features] in the model's dtype.

    Kernel choice: on CPU in bfloat16 the weight is pre-packed once into oneDNN's blocked layout and reused by
    every call (1.4x at batch 64 to 2x at batch 1 faster than F.linear on the plain weight, same results); the
    plain weight is then dropped unless an embedding lookup still needs it. Elsewhere F.linear.
    """

    supports_tensor_parallel = True

    def narrow_checkpoint_tensor(self, layer: Linear, name: str, tensor: torch.Tensor, dim: str, start: int,
                                 size: int) -> torch.Tensor:
        # weight [out_features, in_features]; bias [out_features]
        if dim == "output":
            return narrow_padded(tensor, 0, start, size)
        return tensor.narrow(1, start, size) if name == "weight" else tensor

    def create_weights(self, layer: Linear, in_features: int, output_sizes: Sequence[int],
                       dtype: torch.dtype) -> None:
        weight = make_param(layer, "weight", (sum(output_sizes), in_features), dtype, output_sizes)
        if weight.device.type != "meta":  # a model built for its own sake (tests), not for a checkpoint
            if getattr(layer, "is_embedding", False):
                nn.init.normal_(weight)
            else:
                bound = in_features**-0.5
                nn.init.uniform_(weight, -bound, bound)

    def process_weights_after_loading(self, layer: Linear) -> None:
        weight = layer.loaded_weight()
        layer.onednn_weight = None
        if getattr(layer, "is_embedding", False) and not getattr(layer, "is_tied_output", False):
            return  # lookups only: F.embedding on the plain weight
        if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and _onednn_packing_available():
            layer.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)
            if not getattr(layer, "is_embedding", False):
                del layer.weight  # the packed copy is the weight now
                layer.weight = None

    def weight_bytes(self, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> int:
        return sum(output_sizes) * in_features * dtype.itemsize

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        packed = getattr(layer, "onednn_weight", None)
        if packed is not None and x.dtype == torch.bfloat16:
            out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, layer.in_features), packed, bias, "none", [], "")
            return out.view(*x.shape[:-1], layer.out_features)
        return F.linear(x, layer.loaded_weight(), bias)

    def embedding(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.loaded_weight())


@register_quantization_config("unquantized")
class UnquantizedConfig(QuantizationConfig):
    def get_linear_method(self, prefix: str, shard_prefixes: Sequence[str] = ()) -> LinearMethod:
        return UnquantizedLinearMethod()

    def quantizes_checkpoint(self) -> bool:
        return False
