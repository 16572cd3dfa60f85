"""FP8 (e4m3) checkpoints: vLLM's `quant_method: fp8` (per-tensor weight scales) and llm-compressor's
float-quantized compressed-tensors (per-tensor or per-channel scales).

Tensors of one linear layer: weight float8_e4m3fn [N, K], weight_scale float32 [] / [1] (per tensor) or
[N] / [N, 1] (per output channel), input_scale (static activation scales; unused: activations are
quantized per token at run time on Hopper, and not at all elsewhere); w = weight * weight_scale.

Fused projections (q/k/v, gate/up) hold one per-tensor scale per part: they are kept as per-channel scales
over the fused output, so no part is re-quantized.

Where it runs: on Hopper GPUs and newer (compute capability 9.0 and up) through torch._scaled_mm,
activations quantized per token; elsewhere the weight is dequantized at load to the model's dtype, and the
log says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tokenmill.model.quantization.base import (
    LinearMethod,
    QuantizationConfig,
    default_weight_loader,
    narrow_padded,
    register_quantization_config,
)
from tokenmill.model.quantization.unquantized import UnquantizedLinearMethod
from tokenmill.model.quantization.weight_only import WeightOnlyIntMethod, check_tensor, is_decoder_linear

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max


def fp8_scales_per_channel(prefix: str, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """float32 [N] scales of an fp8 weight [N, K], from a per-tensor or per-channel weight_scale."""
    n = weight.shape[0]
    check_tensor(f"{prefix}.weight", weight, FP8_DTYPE, tuple(weight.shape))
    if weight_scale.numel() == 1:
        scale = weight_scale.reshape(1).float().expand(n)
    elif tuple(weight_scale.shape) in ((n,), (n, 1)):
        scale = weight_scale.reshape(n).float()
    else:
        raise ValueError(f"checkpoint tensor {prefix + '.weight_scale'!r} has shape {tuple(weight_scale.shape)}: "
                         f"expected one scale per tensor ([] or [1]) or per output channel ([{n}] or [{n}, 1]); "
                         "block-wise fp8 scales are not supported")
    if not torch.isfinite(scale).all() or bool((scale <= 0).any()):
        raise ValueError(f"checkpoint tensor {prefix + '.weight_scale'!r} holds scales that are not positive and "
                         "finite: the checkpoint is corrupt")
    return scale.contiguous()


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [N, K] fp8 times its per-channel scale [N], in dtype."""
    return (weight.float() * scale[:, None]).to(dtype)


def scaled_mm_supported(device: torch.device) -> bool:
    """True where fp8 matmuls with row-wise scales run natively: CUDA devices of compute capability 9.0 (Hopper)
    and up."""
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 quantization of activations x [M, K]: (x_fp8 [M, K], scale float32 [M, 1])."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] fp8 * weight_scale [N]).T in x's dtype, with x quantized to fp8 per token and
    the product in fp8 (torch._scaled_mm, row-wise scales on both sides; products accumulate in float32)."""
    x_fp8, x_scale = quantize_per_token(x)
    # _scaled_mm wants the second operand column-major: weight [N, K] row-major, transposed, is [K, N] so.
    out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1).float(),
                           out_dtype=torch.bfloat16)
    out = out.to(x.dtype)
    return out + bias if bias is not None else out


class Fp8LinearMethod(WeightOnlyIntMethod):
    """weight float8_e4m3fn [N, K] with per-tensor (one per shard) or per-channel scales.

    backend: "scaled_mm" (fp8 tensor cores), "dequant" (weights dequantized at load to the model's dtype and run
    as full-precision weights), None: scaled_mm where scaled_mm_supported(device), else dequant."""

    def __init__(self, prefix: str, shard_prefixes: Sequence[str], per_channel: bool,
                 backend: str | None = None, notices: set[str] | None = None) -> None:
        super().__init__(prefix, shard_prefixes, 8, -1)
        if backend not in (None, "scaled_mm", "dequant"):
            raise ValueError(f"fp8 backend {backend!r} is not 'scaled_mm' or 'dequant'")
        self.fp8_backend = backend
        self.per_channel = per_channel
        self.dense = UnquantizedLinearMethod()
        self.notices = notices if notices is not None else set()  # shared by a model's layers: log once

    def narrow_checkpoint_tensor(self, layer: Any, name: str, tensor: torch.Tensor, dim: str, start: int,
                                 size: int) -> torch.Tensor:
        """weight [N, K]: a rank's rows or columns; weight_scale per channel ([N] / [N, 1]): a column-parallel
        rank's rows, whole otherwise (each input column meets every channel's scale); a per-tensor scale and
        the static input_scale: whole (replicated)."""
        if name == "bias":
            return narrow_padded(tensor, 0, start, size) if dim == "output" else tensor
        if name == "weight":
            return narrow_padded(tensor, 0, start, size) if dim == "output" else tensor.narrow(1, start, size)
        if name == "weight_scale" and dim == "output" and tensor.numel() > 1:
            return narrow_padded(tensor, 0, start, size)
        return tensor

    def weight_bytes(self, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> int:
        """fp8 bytes and a float32 scale per output channel on the scaled_mm path; dequantized, the dtype's."""
        n = sum(output_sizes)
        if self.fp8_backend == "scaled_mm":
            return n * in_features + n * 4
        return n * in_features * dtype.itemsize

    def register(self, layer: Any, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> None:
        sizes = list(output_sizes)

        def weight_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
            if tensor.dtype != FP8_DTYPE:
                raise ValueError(f"has dtype {tensor.dtype}, expected {FP8_DTYPE}: the checkpoint is corrupt or "
                                 "its quantization_config does not describe it")
            default_weight_loader(param, tensor, shard_id)

        self.param(layer, "weight", (sum(sizes), in_features), FP8_DTYPE, sizes, output_dim=0, load=weight_loader)

        def scale_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
            # Per tensor: one scale per shard; per channel: [rows] or [rows, 1] for the shard's rows.
            offset, rows = sum(sizes[: shard_id or 0]), sizes[shard_id or 0]
            if tensor.numel() == 1:
                param.data[offset : offset + rows] = tensor.reshape(()).float()
            elif tuple(tensor.shape) in ((rows,), (rows, 1)):
                param.data[offset : offset + rows] = tensor.reshape(rows).float()
            else:
                raise ValueError(f"has shape {tuple(tensor.shape)}: expected one scale per tensor ([] or [1]) or "
                                 f"per output channel ([{rows}] or [{rows}, 1]); block-wise fp8 scales are not "
                                 "supported")

        self.param(layer, "weight_scale", (sum(sizes),), torch.float32, sizes, output_dim=None, load=scale_loader)

        def input_scale_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
            if tensor.numel() != 1:
                raise ValueError(f"has shape {tuple(tensor.shape)}, expected a single static activation scale")
            param.data[shard_id or 0] = tensor.reshape(()).float()

        self.param(layer, "input_scale", (len(sizes),), torch.float32, sizes, output_dim=None,
                   load=input_scale_loader, optional=True)  # static activation scales only

    def validate(self, name: str, tensor: torch.Tensor) -> None:
        if name in ("weight_scale", "input_scale") and (not bool(torch.isfinite(tensor.float()).all())
                                                        or bool((tensor.float() <= 0).any())):
            raise ValueError("holds scales that are not positive and finite: the checkpoint is corrupt")

    def process_weights_after_loading(self, layer: Any) -> None:
        self.check_loaded()
        scale = fp8_scales_per_channel(self.prefix, layer.weight.data, layer.weight_scale.data)
        weight = layer.weight.data
        backend = self.fp8_backend or ("scaled_mm" if scaled_mm_supported(weight.device) else "dequant")
        layer.quant_backend = backend
        if any(name == "input_scale" for name, _ in self._loaded):
            logger.debug("%s: static input_scale unused: activations are scaled per token at run time", self.prefix)
        del layer.input_scale
        if backend == "scaled_mm":
            del layer.weight_scale
            layer.register_buffer("weight_scale", scale, persistent=False)
            return
        if "dequant" not in self.notices:
            self.notices.add("dequant")
            logger.info("fp8 weights are dequantized to %s at load: %s has no fp8 matmul (torch._scaled_mm needs "
                        "a CUDA GPU of compute capability 9.0 or newer)", str(self.dtype).removeprefix("torch."),
                        weight.device)
        dense = dequantize_fp8(weight, scale, self.dtype)
        del layer.weight, layer.weight_scale
        layer.weight = nn.Parameter(dense, requires_grad=False)
        self.dense.process_weights_after_loading(layer)

    def apply(self, layer: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.quant_backend == "scaled_mm":
            x2 = x.reshape(-1, layer.in_features)
            return fp8_scaled_mm(x2, layer.weight, layer.weight_scale, bias).view(*x.shape[:-1], layer.out_features)
        return self.dense.apply(layer, x, bias)


@register_quantization_config("fp8")
class Fp8Config(QuantizationConfig):
    """quantization_config of vLLM-style fp8 checkpoints: {"quant_method": "fp8", "activation_scheme":
    "dynamic" | "static", "ignored_layers": [...]}; weight_block_size (block-wise scales) is rejected."""

    def __init__(self, activation_scheme: str = "dynamic", ignored_layers: Sequence[str] = ()) -> None:
        if activation_scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8 activation_scheme={activation_scheme!r} is not 'dynamic' or 'static'")
        self.activation_scheme = activation_scheme
        self.ignored_layers = list(ignored_layers)
        self.notices: set[str] = set()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        if config.get("weight_block_size"):
            raise ValueError(f"fp8 weight_block_size={config['weight_block_size']} (block-wise scales) is not "
                             "supported: tokenmill loads per-tensor and per-channel fp8 checkpoints")
        return cls(str(config.get("activation_scheme", "dynamic")), config.get("ignored_layers") or ())

    def get_linear_method(self, prefix: str, shard_prefixes: Sequence[str] = ()) -> LinearMethod:
        names = list(shard_prefixes) or [prefix]
        if not is_decoder_linear(prefix) or any(n in self.ignored_layers or
                                                any(n.endswith(f".{i}") for i in self.ignored_layers) for n in names):
            return UnquantizedLinearMethod()
        return Fp8LinearMethod(prefix, shard_prefixes, per_channel=False, notices=self.notices)
