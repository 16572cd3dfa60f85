"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum, the v1 "gptq" format): 4- and 8-bit, group-wise, symmetric
or with zero points, with or without act-order (desc_act).

Tensors of one linear layer (K = in_features, N = out_features, G = K / group_size, b = bits):
    qweight  int32 [K * b / 32, N]   values packed along K, in order (value i of a word in bits [i*b, (i+1)*b))
    qzeros   int32 [G, N * b / 32]   zero points packed along N; v1 stores zero - 1
    scales   fp16  [G, N]
    g_idx    int32 [K]               group of each input channel; act-order checkpoints permute them
    w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]

Act-order is resolved once at load: the input channels are sorted by group (a stable argsort of g_idx), the
weight's K rows reordered to match, and each call gathers x's columns in the same order (one index_select of
the activations), so the kernels only ever see contiguous groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tokenmill.model.quantization.base import LinearMethod, QuantizationConfig, register_quantization_config
from tokenmill.model.quantization.unquantized import UnquantizedLinearMethod
from tokenmill.model.quantization.weight_only import (
    GROUPS,
    CanonicalWeight,
    WeightOnlyIntMethod,
    act_order_permutation,
    check_scales,
    check_tensor,
    is_decoder_linear,
    regroup_by_index,
    unpack_int32,
)

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)  # -1: one group per output channel


def gptq_to_canonical(
    prefix: str,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    zero_offset: int = 1,
) -> CanonicalWeight:
    """Unpack one GPTQ layer (tensors named prefix + ".qweight" etc. in errors) into a CanonicalWeight.
    zero_offset: 1 for the v1 format (stores zero - 1), 0 for v2."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{prefix}: GPTQ with {bits} bits is not supported (bits 4 or 8)")
    per_word = 32 // bits
    k, n = qweight.shape[0] * per_word, qweight.shape[1]
    group = k if group_size == -1 else group_size
    if k % group:
        raise ValueError(f"{prefix}: group_size {group_size} does not divide the {k} input features")
    num_groups = k // group
    check_tensor(f"{prefix}.qweight", qweight, torch.int32, (k // per_word, n))
    check_tensor(f"{prefix}.qzeros", qzeros, torch.int32, (num_groups, -(-n // per_word)))
    check_tensor(f"{prefix}.scales", scales, (torch.float16, torch.bfloat16, torch.float32), (num_groups, n))
    check_scales(f"{prefix}.scales", scales)
    q = unpack_int32(qweight, bits, 0).T  # [N, K]
    zeros = unpack_int32(qzeros, bits, 1)[:, :n].T.to(torch.int32) + zero_offset  # [N, G]
    if int(zeros.max()) >= 2**bits:
        raise ValueError(f"checkpoint tensor {prefix + '.qzeros'!r} holds zero points past {2**bits - 1} after "
                         f"the v1 offset: the checkpoint is corrupt or in the v2 format (checkpoint_format 'gptq_v2')")
    perm = None
    if g_idx is not None:
        check_tensor(f"{prefix}.g_idx", g_idx, (torch.int32, torch.int64), (k,))
        perm = act_order_permutation(f"{prefix}.g_idx", g_idx, num_groups, group)
    if perm is not None:
        q = q[:, perm]
    return CanonicalWeight(q.contiguous(), scales.T.contiguous(), zeros.to(torch.uint8).contiguous(), group, bits,
                           perm)


class GPTQLinearMethod(WeightOnlyIntMethod):
    def __init__(self, prefix: str, shard_prefixes: Sequence[str], bits: int, group_size: int, desc_act: bool,
                 zero_offset: int, symmetric: bool = True, backend: str | None = None) -> None:
        super().__init__(prefix, shard_prefixes, bits, group_size, backend)
        self.desc_act, self.zero_offset = desc_act, zero_offset
        self.symmetric, self.act_order = symmetric, desc_act

    def split_layout(self, name: str) -> dict[str, tuple[int, int]]:
        # qweight [K/pack, N] packs inputs; qzeros [G, N/pack] packs outputs; scales [G, N]; g_idx [K].
        pack = 32 // self.bits
        return {"qweight": {"output": (1, 1), "input": (0, pack)},
                "qzeros": {"output": (1, pack), "input": (0, GROUPS)},
                "scales": {"output": (1, 1), "input": (0, GROUPS)}, "g_idx": {"input": (0, 1)}}.get(name, {})

    def output_pack(self) -> int:
        return 32 // self.bits

    def input_pack(self) -> int:
        return 32 // self.bits

    def checkpoint_bytes(self, in_features: int, out_features: int, group: int) -> int:
        num_groups, per_word = in_features // group, 32 // self.bits
        return (in_features * out_features * self.bits // 8 + num_groups * (out_features // per_word) * 4
                + num_groups * out_features * 2 + in_features * 4)  # qweight, qzeros, fp16 scales, g_idx

    def register(self, layer: Any, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> None:
        pack = 32 // self.bits
        group = in_features if self.group_size == -1 else self.group_size
        if (in_features % group and not self.replicates_groups) or in_features % pack:
            raise ValueError(f"{self.prefix}: GPTQ group_size {self.group_size} ({self.bits} bits) does not divide "
                             f"its {in_features} input features: the checkpoint does not match config.json")
        for shard, rows in zip(self.shard_prefixes, output_sizes, strict=False):
            if rows % pack:
                raise ValueError(f"{shard}: {rows} output features cannot hold {pack} packed zero points per int32")
        n, num_groups = sum(output_sizes), self.num_groups
        self.param(layer, "qweight", (in_features // pack, n), torch.int32, output_sizes, output_dim=1)
        self.param(layer, "qzeros", (num_groups, n // pack), torch.int32, output_sizes, output_dim=1,
                   pack_factor=pack)
        self.param(layer, "scales", (num_groups, n), torch.float16, output_sizes, output_dim=1)
        # Checkpoints without act-order may leave g_idx out (it is then k // group_size).
        self.param(layer, "g_idx", (in_features,), torch.int32, output_sizes, output_dim=None, shared=True,
                   optional=not self.desc_act)

    def validate(self, name: str, tensor: torch.Tensor) -> None:
        super().validate(name, tensor)
        if name == "qzeros" and self.zero_offset == 1 and tensor.dtype == torch.int32:
            # v1 stores zero - 1: a field of all ones would be a zero point of 2^bits, outside the range.
            if bool((unpack_int32(tensor, self.bits, 1) == 2**self.bits - 1).any()):
                raise ValueError(f"holds zero points of {2**self.bits} after the v1 offset (stored {2**self.bits - 1}): "
                                 "the checkpoint is corrupt, or in the v2 format (set checkpoint_format 'gptq_v2')")

    def _g_idx(self, layer: Any) -> torch.Tensor | None:
        return layer.g_idx.data if any(name == "g_idx" for name, _ in self._loaded) else None

    def to_canonical(self, layer: Any) -> CanonicalWeight:
        if self.replicates_groups:
            # A rank's slice of an act-order layer: its channels' groups are scattered over all of them.
            n = layer.out_features
            check_scales(self.shard_name("scales", 0), layer.scales.data)
            q = unpack_int32(layer.qweight.data, self.bits, 0).T  # [N, K_rank]
            zeros = unpack_int32(layer.qzeros.data, self.bits, 1)[:, :n].T.to(torch.int32) + self.zero_offset
            if int(zeros.max()) >= 2**self.bits:
                raise ValueError(f"checkpoint tensor {self.shard_name('qzeros', 0)!r} holds zero points past "
                                 f"{2**self.bits - 1} after the v1 offset: the checkpoint is corrupt")
            return regroup_by_index(q, layer.scales.data.T, zeros.to(torch.uint8), layer.g_idx.data, self.bits)
        return gptq_to_canonical(self.prefix, layer.qweight.data, layer.qzeros.data, layer.scales.data,
                                 self._g_idx(layer), self.bits, self.group_size, self.zero_offset)

    def triton_args(self, layer: Any) -> dict[str, Any]:
        k = layer.in_features
        group = k if self.group_size == -1 else self.group_size
        g_idx = self._g_idx(layer)
        if g_idx is not None and not self.replicates_groups:
            num_groups = k // group
            if act_order_permutation(self.shard_name("g_idx", 0), g_idx.cpu(), num_groups, group) is None:
                g_idx = None  # groups in order: k // group_size, no index to read
        return {"qweight": layer.qweight.data, "scales": layer.scales.data, "qzeros": layer.qzeros.data,
                "layout": "gptq", "bits": self.bits, "group_size": group, "g_idx": g_idx,
                "zero_offset": self.zero_offset}


@register_quantization_config("gptq")
class GPTQConfig(QuantizationConfig):
    """quantization_config of a GPTQ checkpoint: bits, group_size, desc_act, sym, checkpoint_format."""

    def __init__(self, bits: int = 4, group_size: int = 128, desc_act: bool = False, sym: bool = True,
                 checkpoint_format: str = "gptq") -> None:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"GPTQ with bits={bits} is not supported: tokenmill loads 4- and 8-bit GPTQ checkpoints")
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"GPTQ group_size={group_size} is not supported: use 32, 64, 128 or -1 (per channel)")
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format={checkpoint_format!r} is not supported ('gptq' or 'gptq_v2')")
        self.bits, self.group_size, self.desc_act, self.sym = bits, group_size, desc_act, sym
        self.zero_offset = 1 if checkpoint_format == "gptq" else 0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQConfig:
        if config.get("lm_head"):
            raise ValueError("quantization_config.lm_head=true (a GPTQ-quantized lm_head) is not supported")
        if config.get("dynamic"):
            raise ValueError("quantization_config.dynamic (per-module GPTQ overrides) is not supported")
        return cls(int(config.get("bits", 4)), int(config.get("group_size", 128)),
                   bool(config.get("desc_act", False)), bool(config.get("sym", True)),
                   str(config.get("checkpoint_format", "gptq")))

    def get_linear_method(self, prefix: str, shard_prefixes: Sequence[str] = ()) -> LinearMethod:
        if not is_decoder_linear(prefix):
            return UnquantizedLinearMethod()
        return GPTQLinearMethod(prefix, shard_prefixes, self.bits, self.group_size, self.desc_act, self.zero_offset,
                                self.sym)
