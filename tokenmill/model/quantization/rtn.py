"""`--quantization int8|int4` on a full-precision checkpoint: weights quantized at load, round to nearest.

- int8: symmetric, per output channel: scale = max|w| / 127, q = round(w / scale) in -127..127 (W8A16).
- int4: asymmetric, per group of `group_size` inputs (128, else the largest of 64 / 32 dividing in_features):
  scale = (max - min) / 15, zero = round(-min / scale) in 0..15, q = clamp(round(w / scale) + zero, 0, 15);
  w ~ (q - zero) * scale (W4A16).
The decoder's linear layers are quantized; the embedding table and lm_head stay in full precision, as vLLM's
int8/int4 weight-only methods leave them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from tokenmill.kernels.cpu.quant import Int4Weight, Int8Weight, pack_int4, pack_int8
from tokenmill.model.quantization.base import LinearMethod, QuantizationConfig, register_quantization_config
from tokenmill.model.quantization.unquantized import UnquantizedLinearMethod

if TYPE_CHECKING:
    from tokenmill.model.layers.linear import Linear


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scales float32 [N]) with w ~ q * scales[:, None]."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [N, K] in 0..15, scales [N, K / group], zeros [N, K / group]) with w ~ (q - zeros) * scales."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp(0, 15)
    return q.reshape(n, k).to(torch.uint8), scales, zeros


def int4_group_size(in_features: int, preferred: int = 128) -> int:
    for group in (preferred, 128, 64, 32):
        if in_features % group == 0:
            return group
    raise ValueError(f"int4 quantization needs in_features divisible by 32, 64 or 128; got {in_features}")


class _QuantizeAtLoadMethod(UnquantizedLinearMethod):
    """Loads the full-precision weight as the unquantized method does, then quantizes and packs it."""

    def process_weights_after_loading(self, layer: Linear) -> None:
        weight = layer.loaded_weight().detach()
        layer.qweight = self.quantize(weight)
        del layer.weight
        layer.weight = None

    def quantize(self, weight: torch.Tensor) -> Int8Weight | Int4Weight:
        raise NotImplementedError

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = cast("Int8Weight | Int4Weight", layer.qweight).matmul(x)  # packed by process_weights_after_loading
        return out + bias if bias is not None else out


class Int8RTNMethod(_QuantizeAtLoadMethod):
    def quantize(self, weight: torch.Tensor) -> Int8Weight:
        return pack_int8(*quantize_int8(weight))

    def weight_bytes(self, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> int:
        rows = sum(output_sizes)
        return rows * in_features + rows * 4  # int8 values, one float32 scale per output channel


class Int4RTNMethod(_QuantizeAtLoadMethod):
    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def input_split_unit(self, in_features: int) -> int:
        return 32  # the smallest group int4_group_size takes: every rank's inputs must hold whole groups

    def quantize(self, weight: torch.Tensor) -> Int4Weight:
        group = int4_group_size(weight.shape[1], self.group_size)
        q, scales, zeros = quantize_int4(weight, group)
        return pack_int4(q, scales, zeros, group)

    def weight_bytes(self, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> int:
        rows, group = sum(output_sizes), int4_group_size(in_features, self.group_size)
        return rows * in_features // 2 + 2 * rows * (in_features // group) * 2  # nibbles, fp16 scale + offset


_DECODER_LINEARS = ("self_attn.", "mlp.")


def _is_decoder_linear(prefix: str) -> bool:
    return any(part in prefix for part in _DECODER_LINEARS)


@register_quantization_config("int8")
class Int8Config(QuantizationConfig):
    def get_linear_method(self, prefix: str, shard_prefixes: Sequence[str] = ()) -> LinearMethod:
        return Int8RTNMethod() if _is_decoder_linear(prefix) else UnquantizedLinearMethod()

    def quantizes_checkpoint(self) -> bool:
        return False

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype == torch.float16:
            raise ValueError("quantization='int8' runs with bfloat16 or float32 activations: set dtype to one")


@register_quantization_config("int4")
class Int4Config(QuantizationConfig):
    def __init__(self, group_size: int = 128) -> None:
        self.group_size = group_size

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Int4Config:
        return cls(int(config.get("group_size", 128)))

    def get_linear_method(self, prefix: str, shard_prefixes: Sequence[str] = ()) -> LinearMethod:
        return Int4RTNMethod(self.group_size) if _is_decoder_linear(prefix) else UnquantizedLinearMethod()

    def quantizes_checkpoint(self) -> bool:
        return False

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype == torch.float16:
            raise ValueError("quantization='int4' runs with bfloat16 or float32 activations: set dtype to one")
