"""GGUF weights kept quantized: llama.cpp's blocks repacked at load into tokenmill's int4 / int8 kernel layouts.

The converted cache (tokenmill/model/gguf.py) stores each quantized matrix as its raw GGUF blocks, uint8
[rows, row_bytes], and lists their types in config.json's quantization_config ({"quant_method": "gguf",
"tensor_types": {name: "Q4_1", ...}}). At load each type maps to a kernel (no bfloat16 copy is ever made):

  type   llama.cpp's block (elements)                         kernel  what is kept
  Q4_0   d fp16, 32 x 4 bit: w = d * (q - 8)           (32)   int4    exact (float16 scale d, offset -8d)
  Q4_1   d, m fp16, 32 x 4 bit: w = d * q + m          (32)   int4    exact (float16 scale d, offset m)
  Q4_K   d, dmin fp16, 8 x (6-bit sc, m), 256 x 4 bit:  (256)  int4    q exact; per 32: scale d*sc and offset
         w = d * sc_j * q - dmin * m_j per 32                          -dmin*m rounded to float16 (11 bits)
  Q8_0   d fp16, 32 x int8: w = d * q                  (32)   int8    exact (float32 group scales)
  Q6_K   16 int8 sub-scales, d fp16, 256 x 6 bit:       (256)  int8    exact: q - 32 as int8, float32 scale
         w = d * sc_j * (q - 32) per 16                                d*sc per group of 16

F32/F16/BF16 tensors stay full precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokenmill.kernels.cpu.quant import Int4Weight, Int8Weight, pack_int4, pack_int8
from tokenmill.model.quantization.base import (
    LinearMethod,
    QuantizationConfig,
    narrow_padded,
    register_quantization_config,
)
from tokenmill.model.quantization.unquantized import UnquantizedLinearMethod

if TYPE_CHECKING:
    from tokenmill.model.layers.linear import Linear

# type -> (elements per block, bytes per block)
GGUF_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q6_K": (256, 210)}


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] little-endian float16 -> float32 [...]."""
    return raw.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> [..., 2n]: the n low nibbles, then the n high nibbles (llama.cpp's 4-bit order)."""
    return torch.cat((qs & 15, qs >> 4), dim=-1)


def unpack_int4_blocks(raw: torch.Tensor, type_name: str, rows: int, cols: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(q uint8 [rows, cols] in 0..15, scales, zeros-or-None, bias-or-None [rows, cols / 32]) of a Q4_0, Q4_1
    or Q4_K matrix given as raw blocks uint8 [rows, row_bytes]; w = (q - zeros) * scales or q * scales + bias."""
    if type_name == "Q4_0":
        b = raw.reshape(rows, cols // 32, 18)
        return _nibbles(b[..., 2:]).reshape(rows, cols), _f16(b[..., 0:2]), None, None
    if type_name == "Q4_1":
        b = raw.reshape(rows, cols // 32, 20)
        return _nibbles(b[..., 4:]).reshape(rows, cols), _f16(b[..., 0:2]), None, _f16(b[..., 2:4])
    if type_name == "Q4_K":
        b = raw.reshape(rows, cols // 256, 144)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [rows, blocks]
        s = b[..., 4:16].to(torch.int32)  # 12 bytes: 6-bit scale and min of 8 sub-blocks
        sc_lo, m_lo = s[..., 0:4] & 63, s[..., 4:8] & 63
        sc_hi = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
        m_hi = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
        sc = torch.cat((sc_lo, sc_hi), dim=-1).to(torch.float32)  # [rows, blocks, 8]
        m = torch.cat((m_lo, m_hi), dim=-1).to(torch.float32)
        qs = b[..., 16:].reshape(rows, cols // 256, 4, 32)  # 4 chunks of 64 elements: low then high nibbles
        q = _nibbles(qs).reshape(rows, cols)
        scales = (d[..., None] * sc).reshape(rows, cols // 32)
        bias = -(dmin[..., None] * m).reshape(rows, cols // 32)
        return q, scales, None, bias
    raise ValueError(f"{type_name} is not a 4-bit GGUF type")


def unpack_int8_blocks(raw: torch.Tensor, type_name: str, rows: int, cols: int
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(q int8 [rows, cols], scales float32 [rows, cols / group], group) of a Q8_0 or Q6_K matrix; w = q * scale."""
    if type_name == "Q8_0":
        b = raw.reshape(rows, cols // 32, 34)
        return b[..., 2:].contiguous().view(torch.int8).reshape(rows, cols), _f16(b[..., 0:2]), 32
    if type_name == "Q6_K":
        b = raw.reshape(rows, cols // 256, 210)
        ql = b[..., 0:128].reshape(rows, -1, 2, 64)  # two halves of 128 elements
        qh = b[..., 128:192].reshape(rows, -1, 2, 32)
        sub = b[..., 192:208].contiguous().view(torch.int8).to(torch.float32)  # [rows, blocks, 16]
        d = _f16(b[..., 208:210])
        lo, hi = ql[..., :32], ql[..., 32:]
        parts = [
            (lo & 15) | ((qh & 3) << 4),  # elements 0..31 of the half
            (hi & 15) | (((qh >> 2) & 3) << 4),  # 32..63
            (lo >> 4) | (((qh >> 4) & 3) << 4),  # 64..95
            (hi >> 4) | (((qh >> 6) & 3) << 4),  # 96..127
        ]
        q = (torch.cat(parts, dim=-1).to(torch.int16) - 32).to(torch.int8).reshape(rows, cols)
        scales = (d[..., None] * sub).reshape(rows, cols // 16)
        return q, scales, 16
    raise ValueError(f"{type_name} is not an 8-bit GGUF type")


def gguf_kernel(raw: torch.Tensor, type_name: str, rows: int, cols: int) -> Int4Weight | Int8Weight:
    """The kernel object for one GGUF matrix (raw blocks uint8 [rows, row_bytes])."""
    if type_name in ("Q8_0", "Q6_K"):
        q, scales, group = unpack_int8_blocks(raw, type_name, rows, cols)
        return pack_int8(q, scales, group)
    q, scales, zeros, bias = unpack_int4_blocks(raw, type_name, rows, cols)
    return pack_int4(q, scales, zeros, 32, bias=bias)


def row_bytes(type_name: str, cols: int) -> int:
    block, nbytes = GGUF_BLOCKS[type_name]
    if cols % block:
        raise ValueError(f"rows of {cols} elements do not split into {type_name} blocks of {block}")
    return cols // block * nbytes


class GGUFLinearMethod(LinearMethod):
    """Raw GGUF blocks loaded per shard, then one kernel per run of shards of the same kind (int4 or int8): a
    fused q/k/v of one type is one matmul; a mix (Q4_K_M files store attn_v as Q6_K) runs one per kind."""

    supports_tensor_parallel = True

    def __init__(self, types: Sequence[str]) -> None:
        self.types = list(types)

    def input_split_unit(self, in_features: int) -> int:
        return max(GGUF_BLOCKS[t][0] for t in self.types)  # a rank's inputs hold whole blocks of every part

    def narrow_checkpoint_tensor(self, layer: Linear, name: str, tensor: torch.Tensor, dim: str, start: int,
                                 size: int) -> torch.Tensor:
        # Raw blocks uint8 [rows, row_bytes]: rows are outputs; along a row, blocks of `block` inputs.
        if dim == "output":
            return narrow_padded(tensor, 0, start, size)
        # The checkpoint row's type is the same for every shard of a row-parallel layer (one shard).
        block, nbytes = GGUF_BLOCKS[self.types[0]]
        if start % block or size % block:
            raise ValueError(f"input columns [{start}, {start + size}) cut through {self.types[0]} blocks of {block}")
        return tensor.narrow(1, start // block * nbytes, size // block * nbytes)

    def create_weights(self, layer: Linear, in_features: int, output_sizes: Sequence[int],
                       dtype: torch.dtype) -> None:
        if len(output_sizes) != len(self.types):
            raise ValueError(f"{len(self.types)} GGUF types for {len(output_sizes)} shards")
        sizes = [rows * row_bytes(t, in_features) for rows, t in zip(output_sizes, self.types, strict=True)]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        param = nn.Parameter(torch.empty(sum(sizes), dtype=torch.uint8), requires_grad=False)
        layer.register_parameter("weight", param)
        types, rows_of = self.types, list(output_sizes)

        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
            i = shard_id or 0
            expected = (rows_of[i], row_bytes(types[i], in_features))
            if loaded.dtype != torch.uint8 or tuple(loaded.shape) != expected:
                raise ValueError(f"is {loaded.dtype} {tuple(loaded.shape)}, expected the raw {types[i]} blocks "
                                 f"uint8 {expected}: the converted GGUF cache is corrupt, delete it to convert "
                                 "again")
            param.data[offsets[i]: offsets[i] + sizes[i]].copy_(loaded.reshape(-1))

        layer.__dict__.setdefault("param_attrs", {})["weight"] = {"weight_loader": load}
        layer.gguf_dtype = dtype

    def process_weights_after_loading(self, layer: Linear) -> None:
        raw, k = layer.loaded_weight().data, layer.in_features
        kernels: list[tuple[str, list[Any]]] = []  # kind -> parts of consecutive shards
        at = 0
        for rows, type_name in zip(layer.output_sizes, self.types, strict=True):
            nbytes = rows * row_bytes(type_name, k)
            part = raw[at: at + nbytes].reshape(rows, -1)
            at += nbytes
            if type_name in ("Q8_0", "Q6_K"):
                q, scales, group = unpack_int8_blocks(part, type_name, rows, k)
                unpacked: tuple[Any, ...] = ("int8", q, scales, group)
            else:
                q, scales, zeros, bias = unpack_int4_blocks(part, type_name, rows, k)
                if bias is None:
                    bias = -8 * scales  # w = (q - 8) * s = q * s - 8 s
                unpacked = ("int4", q, scales, bias, 32)
            kind = unpacked[0]
            same = kernels and kernels[-1][0] == kind and (kind == "int4" or kernels[-1][1][-1][3] == unpacked[3])
            if same:
                kernels[-1][1].append(unpacked)
            else:
                kernels.append((kind, [unpacked]))
        built: list[Int4Weight | Int8Weight] = []
        for kind, parts in kernels:
            if kind == "int8":
                built.append(pack_int8(torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]),
                                       parts[0][3]))
            else:
                built.append(pack_int4(torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]), None,
                                       32, bias=torch.cat([p[3] for p in parts])))
        layer.qweights = built
        del layer.weight
        layer.weight = None

    def weight_bytes(self, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> int:
        total = 0
        for rows, type_name in zip(output_sizes, self.types, strict=True):
            if type_name in ("Q8_0", "Q6_K"):  # int8 values, a float32 scale per group of 32 / 16
                total += rows * in_features + rows * (in_features // (32 if type_name == "Q8_0" else 16)) * 4
            else:  # nibbles, a float16 scale and offset per group of 32
                total += rows * in_features // 2 + 2 * rows * (in_features // 32) * 2
        return total

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        kernels = layer.qweights
        out = kernels[0].matmul(x) if len(kernels) == 1 else torch.cat([w.matmul(x) for w in kernels], dim=-1)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out + bias if bias is not None else out

    def embedding(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        (kernel,) = layer.qweights
        return kernel.rows(ids, layer.gguf_dtype)


@register_quantization_config("gguf")
class GGUFConfig(QuantizationConfig):
    """tensor_types: checkpoint tensor name -> GGUF type, for every matrix kept quantized."""

    def __init__(self, tensor_types: dict[str, str] | None = None) -> None:
        self.tensor_types = dict(tensor_types or {})
        unsupported = sorted({t for t in self.tensor_types.values() if t not in GGUF_BLOCKS})
        if unsupported:
            raise ValueError(f"GGUF tensor types {unsupported} cannot be kept quantized; supported: "
                             f"{', '.join(GGUF_BLOCKS)}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GGUFConfig:
        return cls(config.get("tensor_types", {}))

    def get_linear_method(self, prefix: str, shard_prefixes: Sequence[str] = ()) -> LinearMethod:
        shards = list(shard_prefixes) or [prefix]
        types = [self.tensor_types.get(f"{shard}.weight") for shard in shards]
        if all(t is None for t in types):
            return UnquantizedLinearMethod()
        if any(t is None for t in types):
            raise ValueError(f"{prefix}: the GGUF file quantizes some parts of this fused layer and not others "
                             f"({dict(zip(shards, types, strict=True))}); this mix is not supported")
        return GGUFLinearMethod([t for t in types if t is not None])

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype == torch.float16:
            raise ValueError("GGUF weights kept quantized run with bfloat16 or float32 activations: set dtype "
                             "to one (or 'auto')")
