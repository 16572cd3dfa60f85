"""compressed-tensors checkpoints, as llm-compressor writes them (`quant_method: "compressed-tensors"`).

Schemes loaded (per config group: `targets` "Linear" or module names / "re:" patterns, minus `ignore`):
- W4A16 / W8A16, format "pack-quantized": weight_packed int32 [N, K * b / 32] (values packed along K in
  order, each stored as q + 2^(b-1)), weight_scale [N, K / group_size] (strategy "group") or [N, 1]
  ("channel"), weight_zero_point int32 [N * b / 32, K / group_size] packed along N (asymmetric only),
  weight_shape [2], weight_g_idx [K] (actorder); w = (q - zero_point) * scale, symmetric: zero_point 0.
- W8A16, format "int-quantized" / "naive-quantized": weight int8 [N, K], weight_scale [N, 1].
- FP8 (W8A8-FP8, FP8_DYNAMIC), format "float-quantized": weight float8_e4m3fn [N, K], weight_scale per tensor
  or per channel: run as in fp8.py.
Integer activation quantization (W8A8 int8, W4A8) and sparsity are rejected.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tokenmill.model.quantization.base import LinearMethod, QuantizationConfig, register_quantization_config
from tokenmill.model.quantization.fp8 import Fp8LinearMethod
from tokenmill.model.quantization.unquantized import UnquantizedLinearMethod
from tokenmill.model.quantization.weight_only import (
    GROUPS,
    CanonicalWeight,
    WeightOnlyIntMethod,
    act_order_permutation,
    check_scales,
    is_decoder_linear,
    regroup_by_index,
    unpack_int32,
)

_PACKED_FORMATS = ("pack-quantized",)
_INT8_FORMATS = ("int-quantized", "naive-quantized")
_FLOAT_FORMATS = ("float-quantized", "naive-quantized")


class CompressedTensorsWNA16Method(WeightOnlyIntMethod):
    """Weight-only int4 / int8 in the pack-quantized or int-quantized layout."""

    def __init__(self, prefix: str, shard_prefixes: Sequence[str], bits: int, group_size: int, symmetric: bool,
                 packed: bool, act_order: bool = False, backend: str | None = None) -> None:
        super().__init__(prefix, shard_prefixes, bits, group_size, backend)
        self.symmetric, self.packed, self.act_order = symmetric, packed, act_order

    def split_layout(self, name: str) -> dict[str, tuple[int, int]]:
        # Output rows first: weight_packed [N, K/pack] packs inputs, weight_zero_point [N/pack, G] packs outputs,
        # weight_scale [N, G], weight_g_idx [K].
        pack = 32 // self.bits
        return {"weight_packed": {"output": (0, 1), "input": (1, pack)},
                "weight": {"output": (0, 1), "input": (1, 1)},
                "weight_scale": {"output": (0, 1), "input": (1, GROUPS)},
                "weight_zero_point": {"output": (0, pack), "input": (1, GROUPS)},
                "weight_g_idx": {"input": (0, 1)}}.get(name, {})

    def output_pack(self) -> int:
        return 1 if self.symmetric else 32 // self.bits

    def input_pack(self) -> int:
        return 32 // self.bits if self.packed else 1

    def narrow_checkpoint_tensor(self, layer: Any, name: str, tensor: torch.Tensor, dim: str, start: int,
                                 size: int) -> torch.Tensor:
        if name != "weight_shape":
            return super().narrow_checkpoint_tensor(layer, name, tensor, dim, start, size)
        # [rows, inputs] of the checkpoint's shard: checked against the whole, then the rank's part of it.
        if tensor.numel() != 2:
            return tensor  # the loader names the problem
        rows, cols = (int(v) for v in tensor.reshape(2).tolist())
        full_in = self.full_in_features if dim == "input" else layer.in_features
        if cols != full_in or (dim == "output" and start >= rows):
            raise ValueError(f"holds {[rows, cols]}, which does not match the layer's {full_in} inputs: the "
                             "checkpoint is corrupt or does not match config.json")
        local = [min(size, rows - start), cols] if dim == "output" else [rows, size]
        return torch.tensor(local, dtype=tensor.dtype)

    def checkpoint_bytes(self, in_features: int, out_features: int, group: int) -> int:
        num_groups, per_word = in_features // group, 32 // self.bits
        total = in_features * out_features * self.bits // 8 + num_groups * out_features * (2 if self.bits == 4 else 4)
        if not self.symmetric:
            total += (out_features // per_word) * num_groups * 4
        if self.bits == 4 or self.act_order:
            total += in_features * 4  # weight_g_idx, kept as GPTQ keeps g_idx
        return total

    def register(self, layer: Any, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> None:
        pack = 32 // self.bits
        group = in_features if self.group_size == -1 else self.group_size
        if (in_features % group and not self.replicates_groups) or in_features % pack:
            raise ValueError(f"{self.prefix}: group_size {self.group_size} does not divide its {in_features} input "
                             "features: the checkpoint does not match config.json")
        n, num_groups = sum(output_sizes), self.num_groups
        if self.packed:
            self.param(layer, "weight_packed", (n, in_features // pack), torch.int32, output_sizes, output_dim=0)
        else:
            self.param(layer, "weight", (n, in_features), torch.int8, output_sizes, output_dim=0)
        # Scales as the planner sizes these layouts: fp16 per group for int4, fp32 per channel for int8.
        scale_dtype = torch.float16 if self.bits == 4 else torch.float32
        self.param(layer, "weight_scale", (n, num_groups), scale_dtype, output_sizes, output_dim=0)
        if not self.symmetric:
            for shard, rows in zip(self.shard_prefixes, output_sizes, strict=False):
                if rows % pack:
                    raise ValueError(f"{shard}: {rows} output features cannot hold {pack} packed zero points "
                                     "per int32")
            self.param(layer, "weight_zero_point", (n // pack, num_groups), torch.int32, output_sizes,
                       output_dim=0, pack_factor=pack)
        if self.packed:
            sizes = list(output_sizes)

            def check_shape(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
                expected = [sizes[shard_id or 0], in_features]
                if tensor.numel() != 2 or tensor.tolist() != expected:
                    raise ValueError(f"holds {tensor.tolist()}, expected {expected}: the checkpoint is corrupt "
                                     "or does not match config.json")

            self.param(layer, "weight_shape", (len(sizes), 2), torch.int64, output_sizes, output_dim=None,
                       load=check_shape)
        self.param(layer, "weight_g_idx", (in_features,), torch.int32, output_sizes, output_dim=None, shared=True,
                   optional=True)  # written with actorder only

    def _unsigned_q(self, layer: Any) -> torch.Tensor:
        """q [N, K] uint8 with the zero point 2^(bits-1) of symmetric values added back."""
        if self.packed:
            return unpack_int32(layer.weight_packed.data, self.bits, 1)
        return (layer.weight.data.to(torch.int16) + 128).to(torch.uint8)

    def _zeros(self, layer: Any, n: int, num_groups: int) -> torch.Tensor:
        if self.symmetric:
            return torch.full((n, num_groups), 2 ** (self.bits - 1), dtype=torch.uint8)
        return unpack_int32(layer.weight_zero_point.data, self.bits, 0)[:n]

    def _g_idx(self, layer: Any, group: int) -> torch.Tensor | None:
        if not any(name == "weight_g_idx" for name, _ in self._loaded):
            return None
        g_idx = layer.weight_g_idx.data
        if self.replicates_groups:
            return g_idx  # indexes every group of the checkpoint's (replicated scales)
        return g_idx if act_order_permutation(self.shard_name("weight_g_idx", 0), g_idx.cpu(),
                                              layer.in_features // group, group) is not None else None

    def to_canonical(self, layer: Any) -> CanonicalWeight:
        k, n = layer.in_features, layer.out_features
        group = k if self.group_size == -1 else self.group_size
        check_scales(self.shard_name("weight_scale", 0), layer.weight_scale.data)
        q = self._unsigned_q(layer)
        zeros = self._zeros(layer, n, self.num_groups)
        g_idx = self._g_idx(layer, group)
        if self.replicates_groups and g_idx is not None:
            return regroup_by_index(q, layer.weight_scale.data, zeros, g_idx, self.bits)
        perm = None if g_idx is None else torch.sort(g_idx.long(), stable=True).indices
        if perm is not None:
            q = q[:, perm]
        return CanonicalWeight(q.contiguous(), layer.weight_scale.data.contiguous(), zeros.contiguous(), group,
                               self.bits, perm)

    def triton_args(self, layer: Any) -> dict[str, Any]:
        # The GPTQ layout transposed: repacked once here, to [K * b / 32, N] packed along K, the kernel's "gptq".
        k, n = layer.in_features, layer.out_features
        group = k if self.group_size == -1 else self.group_size
        pack = 32 // self.bits
        if self.packed:
            qweight = layer.weight_packed.data.T.contiguous()
        else:
            q = (layer.weight.data.to(torch.int32) + 128).view(n, k // pack, pack)
            shifts = torch.arange(0, 32, self.bits, device=q.device, dtype=torch.int32)
            qweight = (q << shifts).sum(dim=-1, dtype=torch.int32).T.contiguous()
        qzeros = None if self.symmetric else layer.weight_zero_point.data.T.contiguous()
        args = {"qweight": qweight, "scales": layer.weight_scale.data.T.contiguous(), "qzeros": qzeros,
                "layout": "gptq", "bits": self.bits, "group_size": group, "g_idx": self._g_idx(layer, group),
                "zero_offset": 0}
        unused = ["weight_packed", "weight", "weight_scale", "weight_zero_point", "weight_shape"]
        if self.bits == 8 and args["g_idx"] is None:
            unused.append("weight_g_idx")  # int8 layouts carry no group index (4-bit ones keep GPTQ's)
        for name in unused:
            if hasattr(layer, name) and isinstance(getattr(layer, name), nn.Parameter):
                delattr(layer, name)
        for name, tensor in args.items():
            if isinstance(tensor, torch.Tensor):
                layer.register_buffer(f"triton_{name}", tensor, persistent=False)
        return args


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith(f".{pattern}")


@register_quantization_config("compressed-tensors")
class CompressedTensorsConfig(QuantizationConfig):
    """quantization_config of an llm-compressor checkpoint: format, config_groups, ignore."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.format = str(config.get("format", "dense"))
        self.groups: list[tuple[list[str], dict[str, Any], dict[str, Any] | None, str]] = []
        if config.get("sparsity_config"):
            raise ValueError("compressed-tensors sparsity_config is not supported: load a dense quantized checkpoint")
        for name, group in (config.get("config_groups") or {}).items():
            if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
                raise ValueError(f"quantization_config.config_groups.{name} has no 'weights' quantization arguments")
            self.groups.append((list(group.get("targets") or []), group["weights"], group.get("input_activations"),
                                str(group.get("format") or self.format)))
            self._check_scheme(name, self.groups[-1])
        if not self.groups:
            raise ValueError("quantization_config.config_groups is empty: nothing says how the weights are quantized")
        self.ignore = list(config.get("ignore") or [])
        self.notices: set[str] = set()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsConfig:
        return cls(config)

    @staticmethod
    def _check_scheme(name: str, scheme: tuple[list[str], dict[str, Any], dict[str, Any] | None, str]) -> None:
        _, weights, acts, fmt = scheme
        kind, bits = weights.get("type", "int"), int(weights.get("num_bits", 8))
        where = f"quantization_config.config_groups.{name}"
        if kind == "float":
            if bits != 8 or fmt not in _FLOAT_FORMATS:
                raise ValueError(f"{where}: float weights of {bits} bits in format {fmt!r} are not supported "
                                 "(fp8: num_bits 8, format 'float-quantized')")
            if weights.get("strategy", "tensor") not in ("tensor", "channel"):
                raise ValueError(f"{where}: fp8 strategy {weights.get('strategy')!r} is not supported "
                                 "('tensor' or 'channel')")
            if acts and acts.get("type", "float") != "float":
                raise ValueError(f"{where}: fp8 weights with {acts.get('type')} activations are not supported")
            return
        if kind != "int":
            raise ValueError(f"{where}: weight type {kind!r} is not supported ('int' or 'float')")
        if acts:
            raise ValueError(f"{where}: activation quantization ({acts.get('type', 'int')}{acts.get('num_bits', '')}"
                             ") is not supported with integer weights; tokenmill runs weight-only W4A16 / W8A16 "
                             "schemes")
        if bits not in (4, 8):
            raise ValueError(f"{where}: int weights of {bits} bits are not supported (4 or 8)")
        strategy = weights.get("strategy", "group" if weights.get("group_size") else "channel")
        if strategy not in ("group", "channel"):
            raise ValueError(f"{where}: strategy {strategy!r} is not supported ('group' or 'channel')")
        if strategy == "group" and int(weights.get("group_size") or 0) not in (32, 64, 128):
            raise ValueError(f"{where}: group_size {weights.get('group_size')} is not supported (32, 64 or 128)")
        if fmt in _INT8_FORMATS and not weights.get("symmetric", True):
            raise ValueError(f"{where}: asymmetric int8 weights in format {fmt!r} are not supported")
        if fmt not in _PACKED_FORMATS + _INT8_FORMATS or (fmt in _INT8_FORMATS and bits != 8):
            raise ValueError(f"{where}: format {fmt!r} is not supported for int{bits} weights "
                             "('pack-quantized', or 'int-quantized' for int8)")

    def _scheme(self, name: str) -> tuple[list[str], dict[str, Any], dict[str, Any] | None, str] | None:
        if any(_matches(name, pattern) for pattern in self.ignore):
            return None
        for scheme in self.groups:
            if any(t == "Linear" or _matches(name, t) for t in scheme[0]):
                return scheme
        return None

    def get_linear_method(self, prefix: str, shard_prefixes: Sequence[str] = ()) -> LinearMethod:
        names = list(shard_prefixes) or [prefix]
        if not is_decoder_linear(prefix):
            # embed_tokens and lm_head: llm-compressor leaves them out ("ignore": ["lm_head"]; not Linear).
            return UnquantizedLinearMethod()
        schemes = [self._scheme(n) for n in names]
        if any(s is not schemes[0] for s in schemes):
            raise ValueError(f"{prefix}: the parts of this fused layer ({', '.join(names)}) are quantized by "
                             "different config_groups (or some are ignored); tokenmill needs them alike")
        scheme = schemes[0]
        if scheme is None:
            return UnquantizedLinearMethod()
        _, weights, _, fmt = scheme
        bits = int(weights.get("num_bits", 8))
        if weights.get("type", "int") == "float":
            return Fp8LinearMethod(prefix, shard_prefixes, per_channel=weights.get("strategy") == "channel",
                                   notices=self.notices)
        group = int(weights["group_size"]) if weights.get("strategy", "group") == "group" and \
            weights.get("group_size") else -1
        return CompressedTensorsWNA16Method(prefix, shard_prefixes, bits, group, bool(weights.get("symmetric", True)),
                                            packed=fmt in _PACKED_FORMATS, act_order=bool(weights.get("actorder")))
