"""What the weight-only integer formats (AWQ, GPTQ, compressed-tensors pack-quantized) share: the canonical
form each checkpoint layout is unpacked to, the checks that name a bad checkpoint tensor, and the LinearMethod
that runs the weight where the model lives.

- CPU: the canonical (q, scales, zeros) goes to the CPU kernels (tokenmill/kernels/cpu/quant.py): pack_int4
  for 4 bits, pack_int8 for 8 bits (symmetric: zero point 2^(bits-1)); the checkpoint layout is freed.
- CUDA: the checkpoint tensors stay as loaded and the Triton GEMM reads them in place
  (tokenmill/kernels/triton/quant_gemm.py), act-order through g_idx.
The backend is chosen once, when the weights are processed after loading, from the device they live on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenmill.model.quantization.base import LinearMethod, default_weight_loader, make_param, narrow_padded

logger = logging.getLogger(__name__)

# Linear layers inside the decoder blocks: what AWQ, GPTQ and llm-compressor quantize (embeddings and lm_head
# stay in full precision).
_DECODER_LINEARS = (".self_attn.", ".mlp.")


def is_decoder_linear(prefix: str) -> bool:
    return any(part in f".{prefix}." for part in _DECODER_LINEARS)

@dataclass
class CanonicalWeight:
    """A group-quantized weight in the form the kernels take, whatever the checkpoint layout.

    q [N, K] uint8 (0 .. 2^bits - 1), scales [N, G] and zeros [N, G] uint8 with
    w[n, k] = (q[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]; perm [K] (int64) or None:
    the layer computes y = x[:, perm] @ w.T (act-order checkpoints)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    bits: int
    perm: torch.Tensor | None = None


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """uint8 values of `packed` (int32) unpacked along `dim`, value i of each word from bits [i*b, (i+1)*b)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    moved = packed.movedim(dim, -1)
    values = (moved.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [..., words, per_word]
    values = values.reshape(*moved.shape[:-1], moved.shape[-1] * per_word)
    return values.movedim(-1, dim).to(torch.uint8)


def check_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype | tuple[torch.dtype, ...],
                 shape: tuple[int, ...]) -> None:
    """ValueError naming the checkpoint tensor when its dtype or shape is not the layout's."""
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if tensor.dtype not in dtypes:
        raise ValueError(f"checkpoint tensor {name!r} has dtype {tensor.dtype}, expected "
                         f"{' or '.join(str(d) for d in dtypes)}: the checkpoint is corrupt or not this format")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}: "
                         "the checkpoint is corrupt or its quantization_config does not describe it")


def check_scales(name: str, scales: torch.Tensor) -> None:
    if not torch.isfinite(scales.float()).all():
        raise ValueError(f"checkpoint tensor {name!r} holds non-finite scales (nan or inf): the checkpoint is corrupt")


def act_order_permutation(name: str, g_idx: torch.Tensor, num_groups: int, group_size: int) -> torch.Tensor | None:
    """The order of input channels that makes groups contiguous, or None when g_idx is already k // group_size.
    ValueError when g_idx is not a grouping of K channels into groups of group_size."""
    k = g_idx.shape[0]
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups):
        raise ValueError(f"checkpoint tensor {name!r} holds group indices outside 0..{num_groups - 1}: "
                         "the checkpoint is corrupt")
    sequential = torch.arange(k, device=g_idx.device) // group_size
    if torch.equal(g_idx.long(), sequential):
        return None
    counts = torch.bincount(g_idx.long(), minlength=num_groups)
    if not bool((counts == group_size).all()):
        raise ValueError(f"checkpoint tensor {name!r} does not put {group_size} input channels in every group "
                         f"(group sizes {sorted(set(counts.tolist()))}): the checkpoint is corrupt")
    return torch.sort(g_idx.long(), stable=True).indices


# The kernel group that regroup_by_index pads each group's channels to: the smallest the int4 kernel takes, and a
# multiple of 16 as the int8 kernel needs.
REGROUP_UNIT = 32


def regroup_by_index(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
                     unit: int = REGROUP_UNIT) -> CanonicalWeight:
    """A weight whose input channels fall into groups in any number (one tensor-parallel rank's slice of an
    act-order layer: its channels meet every group, a few each) as contiguous kernel groups of `unit` channels.

    q [N, K] uint8, scales / zeros [N, G] over all the groups g_idx [K] indexes. The channels are sorted by group
    and each group's run padded to a multiple of `unit` with columns holding the group's zero point (weight 0;
    they read input column 0, which they multiply by nothing); perm [K'] gathers the inputs in that order."""
    n, k = q.shape
    order = torch.sort(g_idx.long(), stable=True).indices  # [K] channels in group order
    present, counts = torch.unique_consecutive(g_idx.long()[order], return_counts=True)
    padded = (counts + unit - 1) // unit * unit  # channels of each present group once padded
    total = int(padded.sum())
    run_start = torch.cumsum(padded, 0) - padded  # where each group's run begins in the padded order
    first = torch.cumsum(counts, 0) - counts  # where each group begins in `order`
    within = torch.arange(k) - torch.repeat_interleave(first, counts)
    dest = torch.repeat_interleave(run_start, counts) + within  # [K] padded position of order[i]
    perm = torch.zeros(total, dtype=torch.int64)
    perm[dest] = order
    column_group = torch.repeat_interleave(present, padded)  # [K'] the group of each padded column
    new_q = zeros[:, column_group].to(torch.uint8).clone()  # padding: q == zero point, a weight of exactly 0
    new_q[:, dest] = q[:, order]
    kernel_group = torch.repeat_interleave(present, padded // unit)  # [K' / unit] source group of each
    return CanonicalWeight(new_q.contiguous(), scales[:, kernel_group].contiguous(),
                           zeros[:, kernel_group].to(torch.uint8).contiguous(), unit, bits, perm)


def expand_groups(c: CanonicalWeight, allowed: Sequence[int]) -> CanonicalWeight:
    """The same weight with groups of an allowed size: a group of G channels is split into G / g groups that
    repeat its scale and zero point (per-channel checkpoints, group_size -1, on kernels with bounded groups)."""
    if c.group_size in allowed:
        return c
    k = c.q.shape[1]
    for group in sorted(allowed, reverse=True):
        if c.group_size % group == 0 and k % group == 0:
            repeat = c.group_size // group
            return CanonicalWeight(c.q, c.scales.repeat_interleave(repeat, dim=1),
                                   c.zeros.repeat_interleave(repeat, dim=1), group, c.bits, c.perm)
    raise ValueError(f"groups of {c.group_size} input channels cannot run on kernels with groups of "
                     f"{', '.join(map(str, allowed))}")


# split_layout's marker: the axis counts quantization groups (its unit is the group size).
GROUPS = -1


class WeightOnlyIntMethod(LinearMethod):
    """A group-quantized integer weight (W4A16 / W8A16) loaded from a checkpoint layout.

    Subclasses register the layout's tensors (self.param) and say how to unpack them (to_canonical) and how
    the Triton GEMM reads them in place (triton_args). One instance per layer: it knows the layer's checkpoint
    names (for errors) and which shards of each tensor arrived.

    Tensor parallelism: split_layout says, for each checkpoint tensor, which axis holds the outputs (N) and
    which the inputs (K), and how many of them one element covers (a pack of 8 int4 values in an int32, a
    group's scale). A column-parallel rank takes its outputs' elements, a row-parallel rank its inputs' (whole
    packs and whole groups: input_split_unit). Act-order layers (g_idx) split by rows are the exception: a rank's
    input channels belong to groups all over K, so it keeps every group's scales and zero points (replicated,
    as vLLM does) and its slice of g_idx, which indexes them.
    """

    supports_tensor_parallel = True

    def __init__(self, prefix: str, shard_prefixes: Sequence[str], bits: int, group_size: int,
                 backend: str | None = None) -> None:
        self.prefix = prefix
        self.shard_prefixes = list(shard_prefixes) or [prefix]
        self.bits, self.group_size = bits, group_size
        if backend not in (None, "cpu", "triton"):
            raise ValueError(f"backend {backend!r} is not 'cpu' or 'triton'")
        self.backend = backend  # None: chosen from the device the weights are loaded on
        self.symmetric = True  # no zero points (2^(bits-1)): set by formats that store them
        self.act_order = False  # input channels grouped in a permuted order (g_idx)
        # Tensor parallelism, set by create_weights from the layer's TensorParallelShard:
        self.tp_size = 1
        self.row_parallel = False  # this rank holds a slice of the inputs (row-parallel, tp_size > 1)
        self.full_in_features = 0  # the checkpoint's inputs, before the split
        self.dtype = torch.bfloat16
        self._expected: list[str] = []
        self._loaded: set[tuple[str, int | None]] = set()
        self.num_groups = 1
        self._registered: list[str] = []  # every checkpoint tensor registered, optional ones included

    # ---- subclass interface ---------------------------------------------------------------------------------
    def checkpoint_bytes(self, in_features: int, out_features: int, group: int) -> int:
        """Bytes of the layer's checkpoint layout as the GPU path keeps it (the Triton GEMM reads it in place)."""
        raise NotImplementedError

    def weight_bytes(self, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> int:
        """The processed layout's bytes: the checkpoint layout where the Triton GEMM runs (backend "triton"),
        else the CPU kernels' (int4: nibbles plus a float16 scale and offset per group; int8: bytes plus a
        float32 scale per group; act-order: the int32 input permutation). Act-order checkpoints whose g_idx is
        already in order keep no permutation, 4 * in_features bytes fewer."""
        n, k = sum(output_sizes), in_features
        group = k if self.group_size <= 0 else self.group_size
        if self.backend == "triton":
            return self.checkpoint_bytes(k, n, group)
        from tokenmill.kernels.cpu.quant import INT4_GROUP_SIZES

        perm = 4 * k if self.act_order else 0
        if self.bits == 4 and (dtype != torch.float32 or self.symmetric):
            kernel_group = group if group in INT4_GROUP_SIZES else max(
                g for g in INT4_GROUP_SIZES if group % g == 0 and k % g == 0)
            return n * k // 2 + 2 * n * (k // kernel_group) * 2 + perm
        return n * k + n * (k // group) * 4 + perm

    def to_canonical(self, layer: Any) -> CanonicalWeight:
        raise NotImplementedError

    def triton_args(self, layer: Any) -> dict[str, Any]:
        raise NotImplementedError

    # ---- shared machinery -------------------------------------------------------------------------------------
    def shard_name(self, tensor: str, shard_id: int | None) -> str:
        """The checkpoint name of one shard of a tensor, e.g. model.layers.0.self_attn.k_proj.qzeros."""
        return f"{self.shard_prefixes[shard_id or 0]}.{tensor}"

    def param(self, layer: Any, name: str, shape: Sequence[int], dtype: torch.dtype,
              output_sizes: Sequence[int], output_dim: int | None, pack_factor: int = 1,
              shared: bool = False, load: Any = None, optional: bool = False) -> nn.Parameter:
        """Register checkpoint tensor `name`; shared: one copy for all shards (each shard must hold the same);
        load(param, tensor, shard_id): a loader of its own; optional: checkpoints may leave it out (the
        parameter's `optional` attribute tells the model's completeness check)."""
        method = self

        def loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
            # ValueError messages say what is wrong; the model's loader prefixes the checkpoint tensor's name.
            method.validate(name, tensor)
            if load is not None:
                load(param, tensor, shard_id)
            elif shared and any(n == name for n, _ in method._loaded):
                if tuple(tensor.shape) != tuple(param.shape) or not torch.equal(tensor.to(param.dtype), param.data):
                    raise ValueError(f"differs from the {name} of the other parts of {method.prefix}, which share "
                                     "one input: the checkpoint is corrupt, or this fused layer cannot load it")
            else:
                default_weight_loader(param, tensor, None if shared else shard_id)
            method._loaded.add((name, shard_id))

        if not optional:
            self._expected.append(name)
        param = make_param(layer, name, shape, dtype, output_sizes, output_dim=output_dim, pack_factor=pack_factor,
                           weight_loader=loader)
        setattr(param, "optional", optional)  # noqa: B010  (a Parameter attribute, like weight_loader)
        layer.__dict__["param_attrs"][name]["optional"] = optional  # survives the move off the meta device
        self._registered.append(name)
        return param

    def validate(self, name: str, tensor: torch.Tensor) -> None:
        """ValueError (completed with the tensor's name by the loader) when a checkpoint tensor's values are bad."""
        if name in ("scales", "weight_scale") and tensor.is_floating_point() and \
                not bool(torch.isfinite(tensor.float()).all()):
            raise ValueError("holds non-finite scales (nan or inf): the checkpoint is corrupt")
        if name in ("g_idx", "weight_g_idx") and tensor.numel() and \
                (int(tensor.min()) < 0 or int(tensor.max()) >= self.num_groups):
            raise ValueError(f"holds group indices outside 0..{self.num_groups - 1}: the checkpoint is corrupt")

    def check_loaded(self) -> None:
        num_shards = len(self.shard_prefixes)
        for name in self._expected:
            for shard in range(num_shards):
                shard_id = shard if num_shards > 1 else None
                if (name, shard_id) not in self._loaded:
                    raise ValueError(f"checkpoint tensor {self.shard_name(name, shard_id)!r} is missing: the "
                                     "download is incomplete or the files do not match config.json")

    def create_weights(self, layer: Any, in_features: int, output_sizes: Sequence[int],
                       dtype: torch.dtype) -> None:
        self.dtype = dtype
        shard = getattr(layer, "tp_shard", None)
        self.full_in_features = in_features
        if shard is not None and shard.tensor_parallel_size > 1:
            self.tp_size = shard.tensor_parallel_size
            self.row_parallel = shard.kind == "row"
            if self.row_parallel:
                self.full_in_features = shard.full_in_features
            else:
                self.check_output_split(output_sizes)
        self.num_groups = self.stored_groups(in_features)
        self.register(layer, in_features, output_sizes, dtype)

    # ---- tensor parallelism -----------------------------------------------------------------------------------
    def split_layout(self, name: str) -> dict[str, tuple[int, int]]:
        """Checkpoint tensor `name`'s axes: {"output" or "input": (axis, channels per element)}; GROUPS as the
        count: one element per quantization group. A dimension left out: the tensor does not depend on it."""
        return {}

    def output_pack(self) -> int:
        """Outputs that one element of the layout packs together (a rank's share must hold whole ones)."""
        return 1

    @property
    def replicates_groups(self) -> bool:
        """Whether this rank keeps every group's scales and zero points: an act-order layer split by rows."""
        return self.act_order and self.group_size > 0 and self.row_parallel

    def stored_groups(self, in_features: int) -> int:
        """Groups of scales the layer holds: its own inputs', or every group of the checkpoint's (replicated)."""
        if self.group_size <= 0:
            return 1
        k = self.full_in_features if self.replicates_groups else in_features
        return max(1, k // self.group_size)

    def input_split_unit(self, in_features: int) -> int:
        pack = self.input_pack()
        if self.act_order or self.group_size <= 0:
            return pack  # act-order: scales replicated, any whole pack of inputs splits
        return math.lcm(self.group_size, pack)

    def input_split_note(self) -> str:
        if self.act_order or self.group_size <= 0:
            return f" (packs of {self.input_pack()} inputs)" if self.input_pack() > 1 else ""
        return f" (group_size {self.group_size})"

    def input_pack(self) -> int:
        """Inputs packed into one element along K (GPTQ's qweight: 32 / bits)."""
        return 1

    def check_output_split(self, output_sizes: Sequence[int]) -> None:
        pack = self.output_pack()
        for shard, rows in zip(self.shard_prefixes, output_sizes, strict=False):
            if rows % pack:
                full = rows * self.tp_size
                valid = [t for t in range(1, max(8, self.tp_size) + 1) if full % t == 0 and (full // t) % pack == 0]
                raise ValueError(
                    f"{shard}: its {full} outputs split over tensor_parallel_size={self.tp_size} give {rows} per "
                    f"rank, which cuts through the packs of {pack} outputs per int32 of its {type(self).__name__} "
                    f"weights: sizes that split this layer are {', '.join(map(str, valid))}")

    def narrow_checkpoint_tensor(self, layer: Any, name: str, tensor: torch.Tensor, dim: str, start: int,
                                 size: int) -> torch.Tensor:
        if name == "bias":  # [N], in full precision; a row-parallel layer adds it once, after the all-reduce
            return narrow_padded(tensor, 0, start, size) if dim == "output" else tensor
        axis_unit = self.split_layout(name).get(dim)
        if axis_unit is None:
            return tensor
        axis, unit = axis_unit
        if unit == GROUPS:
            if self.group_size <= 0 or self.replicates_groups:
                return tensor  # one group per channel: [1, N]; or act-order's replicated groups
            unit = self.group_size
        if axis >= tensor.dim():
            return tensor  # a malformed tensor: the loader names the shape it expected
        if start % unit or size % unit:
            what = "groups" if unit == self.group_size else "packs"
            raise ValueError(f"{self.prefix}: a tensor-parallel rank's {dim}s [{start}, {start + size}) cut "
                             f"through its {what} of {unit}")
        if dim == "output":
            return narrow_padded(tensor, axis, start // unit, size // unit)
        part = tensor.narrow(axis, start // unit, size // unit)
        if name in ("g_idx", "weight_g_idx") and not self.replicates_groups and self.group_size > 0:
            part = part - start // self.group_size  # the rank's own groups count from 0
        return part

    def register(self, layer: Any, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: Any) -> None:
        self.check_loaded()
        device = next(p.device for p in layer.parameters())
        backend = self.backend or ("triton" if device.type == "cuda" else "cpu")
        layer.quant_backend = backend
        if backend == "triton":
            layer.triton_args = self.triton_args(layer)
            return
        if self.dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"{self.prefix}: {self.bits}-bit weights run on the CPU with bfloat16 or float32 "
                             f"activations, not {self.dtype}: set dtype='bfloat16' (--dtype bfloat16)")
        from tokenmill.kernels.cpu.quant import INT4_GROUP_SIZES, pack_int4, pack_int8

        try:
            c = self.to_canonical(layer)
            packed: Any
            if c.bits == 4 and (self.dtype != torch.float32 or self.symmetric):
                c = expand_groups(c, INT4_GROUP_SIZES)
                packed = pack_int4(c.q, c.scales, c.zeros, c.group_size)
            elif c.bits == 4:
                # float32 activations with zero points: the int4 kernel's float16 offsets (-zero * scale) would
                # round the weight, so q - zero (-15..15) is held in int8 with float32 group scales, exactly.
                # (Symmetric offsets, -8 * a float16 scale, are exact in float16.)
                packed = pack_int8((c.q.to(torch.int16) - c.zeros.to(torch.int16).repeat_interleave(
                    c.group_size, dim=1)).to(torch.int8), c.scales.float(), c.group_size)
                logger.debug("%s: float32 activations with zero points: int4 values held as int8", self.prefix)
            else:
                mid = 2 ** (c.bits - 1)
                if not bool((c.zeros == mid).all()):
                    raise ValueError(f"8-bit weights with zero points (asymmetric) are not supported on the CPU, "
                                     f"only symmetric ones (zero point {mid})")
                q = (c.q.to(torch.int16) - mid).to(torch.int8)
                packed = pack_int8(q, c.scales.float(), c.group_size)
        except ValueError as e:
            message = str(e)
            named = message.startswith((self.prefix, "checkpoint tensor"))
            raise ValueError(message if named else f"{self.prefix}: {message}") from None
        for name in self._registered:
            delattr(layer, name)
        layer.qweight = packed
        layer.input_perm = c.perm.to(torch.int32) if c.perm is not None else None
        if c.perm is not None:
            logger.debug("%s: act-order: input channels gathered in group order at every call", self.prefix)

    def apply(self, layer: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.quant_backend == "triton":
            from tokenmill.kernels.triton.quant_gemm import quant_gemm

            x2 = x.reshape(-1, layer.in_features)
            out = quant_gemm(x2 if x2.stride(-1) == 1 else x2.contiguous(), bias=bias, **layer.triton_args)
            return out.view(*x.shape[:-1], layer.out_features)
        if layer.input_perm is not None:
            # act-order: the weight's input channels were sorted by group at load; x's columns follow them.
            x = x.index_select(-1, layer.input_perm)
        out = layer.qweight.matmul(x)
        return out + bias if bias is not None else out
