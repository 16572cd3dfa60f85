"""How a linear layer's weight is stored and multiplied: the quantization method, chosen at construction.

A QuantizationConfig describes a checkpoint's format (read from config.json's quantization_config, from a GGUF
file, or asked for with --quantization to quantize at load); for every linear layer of the model it hands out
a LinearMethod, which
1. create_weights: registers the layer's parameters (shapes and dtypes of the checkpoint's tensors: weight, or
   qweight / scales / qzeros / g_idx ...), each with a weight_loader that copies one checkpoint tensor (one
   shard of a fused layer) into it;
2. process_weights_after_loading: repacks what was loaded into the layout of the kernel that will run it,
   chosen here once per shape and device (never per call), and frees the checkpoint layout;
3. apply: the layer's forward, x [..., in_features] -> [..., out_features].

The registry maps vLLM's names (--quantization / LLM(quantization=...) / ModelConfig.quantization, and
config.json's quant_method) to the config classes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from tokenmill.model.layers.linear import Linear

# weight_loader(param, checkpoint tensor, shard_id): copies one checkpoint tensor (one shard's) into param.
WeightLoader = Callable[[nn.Parameter, torch.Tensor, int | None], None]


class LinearMethod(ABC):
    """The storage and kernels of one linear layer's weight. Stateless: per-layer state lives on the layer."""

    # Whether narrow_checkpoint_tensor can cut one tensor-parallel rank's part out of the checkpoint's tensors.
    supports_tensor_parallel: ClassVar[bool] = False

    def narrow_checkpoint_tensor(self, layer: Linear, name: str, tensor: torch.Tensor, dim: str, start: int,
                                 size: int) -> torch.Tensor:
        """One tensor-parallel rank's part of checkpoint tensor `name` of the layer: dim "output", the weight's
        rows [start, start + size) (past the checkpoint's rows: zeros, a padded vocabulary); dim "input", its
        input columns [start, start + size). A tensor that does not depend on that dimension comes back whole."""
        raise ValueError(f"{type(self).__name__} weights cannot be split over tensor-parallel ranks")

    def input_split_unit(self, in_features: int) -> int:
        """The input columns that must stay together on one rank (a quantization block or group): a
        row-parallel split must give each rank a multiple of it."""
        return 1

    def input_split_note(self) -> str:
        """What input_split_unit stands for, for the error that refuses a split (e.g. " (group_size 64)")."""
        return ""

    @abstractmethod
    def create_weights(self, layer: Linear, in_features: int, output_sizes: Sequence[int],
                       dtype: torch.dtype) -> None:
        """Register the layer's parameters for a weight [sum(output_sizes), in_features]. output_sizes lists the
        rows of each shard of a fused layer (q, k, v or gate, up), in checkpoint order; dtype is the model's
        activation dtype. Each parameter gets a `weight_loader(param, tensor, shard_id)` attribute (see
        default_weight_loader)."""

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Repack the loaded parameters into the kernel's layout (once, after every shard is loaded)."""
        return None

    @abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in_features] @ weight.T (+ bias) -> [..., out_features] in x's dtype."""

    def weight_bytes(self, in_features: int, output_sizes: Sequence[int], dtype: torch.dtype) -> int:
        """Bytes the layer's weight occupies once processed (its kernel layout, bias excluded), computed
        without tensors: the planner's figure, which tests check against the real allocations."""
        raise NotImplementedError(f"{type(self).__name__} does not model its memory")

    def embedding(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight [num_ids, in_features] in the model's dtype (for embedding tables)."""
        raise NotImplementedError(f"{type(self).__name__} cannot store an embedding table")


class QuantizationConfig(ABC):
    """A quantized checkpoint format (or a quantize-at-load recipe)."""

    name: ClassVar[str]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        """From config.json's quantization_config (or {} when asked for by name only)."""
        return cls()

    @abstractmethod
    def get_linear_method(self, prefix: str, shard_prefixes: Sequence[str] = ()) -> LinearMethod:
        """The method of the linear layer `prefix` (our name, e.g. "model.layers.0.self_attn.qkv_proj"); for a
        fused layer, shard_prefixes are the checkpoint's names of its parts ("...q_proj", "...k_proj", ...).
        "lm_head" and "model.embed_tokens" are asked too: return UnquantizedLinearMethod() where the format
        leaves them in full precision."""

    def quantizes_checkpoint(self) -> bool:
        """Whether the checkpoint itself is quantized (False: full-precision weights quantized at load)."""
        return True

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Raise ValueError if the method cannot run with activations of `dtype`."""
        return None


def narrow_padded(tensor: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
    """tensor's [start, start + size) along dim; the part past its end (a vocabulary padded to a multiple of the
    tensor-parallel ranks) filled with zeros."""
    available = max(0, min(size, tensor.shape[dim] - start))
    part = tensor.narrow(dim, start, available) if available else tensor.narrow(dim, 0, 0)
    if available == size:
        return part
    shape = list(tensor.shape)
    shape[dim] = size - available
    return torch.cat((part, torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)), dim=dim)


def set_weight_attrs(param: nn.Parameter, **attrs: Any) -> nn.Parameter:
    for key, value in attrs.items():
        setattr(param, key, value)
    return param


def param_attr(param: nn.Parameter, name: str) -> Any:
    """An attribute set_weight_attrs put on param (AttributeError if it has none)."""
    return getattr(param, name)


def weight_loader_of(param: nn.Parameter) -> WeightLoader:
    """The weight_loader of param (see make_param)."""
    loader: WeightLoader = param_attr(param, "weight_loader")
    return loader


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
    """Copy a checkpoint tensor into param, or into one shard's slice of it.

    A parameter of a fused layer says where its shards go with attributes: output_dim (the dimension along which
    shards are stacked; None: shared by all shards, each shard loads the same values), shard_offsets /
    shard_sizes (in rows of the full weight), and pack_factor (output rows per element along output_dim, e.g.
    8 for int4 packed 8 to an int32 along the output dimension).
    """
    output_dim = getattr(param, "output_dim", None)
    dest = param.data
    if shard_id is not None and output_dim is not None:
        pack = getattr(param, "pack_factor", 1)
        offsets: list[int] = param_attr(param, "shard_offsets")
        sizes: list[int] = param_attr(param, "shard_sizes")
        offset, size = offsets[shard_id], sizes[shard_id]
        dest = dest.narrow(output_dim, offset // pack, size // pack)
    if tuple(dest.shape) != tuple(loaded.shape):
        raise ValueError(f"has shape {tuple(loaded.shape)}, expected {tuple(dest.shape)}")
    if loaded.dtype != dest.dtype and not (loaded.is_floating_point() and dest.is_floating_point()):
        raise ValueError(f"has dtype {loaded.dtype}, expected {dest.dtype}")
    dest.copy_(loaded)


def make_param(layer: nn.Module, name: str, shape: Sequence[int], dtype: torch.dtype, output_sizes: Sequence[int],
               output_dim: int | None = 0, pack_factor: int = 1,
               weight_loader: WeightLoader = default_weight_loader) -> nn.Parameter:
    """Register an uninitialized parameter `name` on layer, with shard bookkeeping for default_weight_loader."""
    param = nn.Parameter(torch.empty(tuple(shape), dtype=dtype), requires_grad=False)
    offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
    attrs = dict(output_dim=output_dim, pack_factor=pack_factor, shard_offsets=offsets,
                 shard_sizes=list(output_sizes), weight_loader=weight_loader)
    set_weight_attrs(param, **attrs)
    layer.register_parameter(name, param)
    # Also kept on the layer: moving a model from the meta device to real storage replaces its Parameters.
    layer.__dict__.setdefault("param_attrs", {})[name] = attrs
    return param


# ---- registry ---------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[QuantizationConfig]] = {}


def register_quantization_config(name: str) -> Callable[[type[QuantizationConfig]], type[QuantizationConfig]]:
    """Class decorator: make the config available as --quantization `name` and quant_method `name`."""

    def wrap(cls: type[QuantizationConfig]) -> type[QuantizationConfig]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"quantization method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def quantization_methods() -> list[str]:
    """Every registered name, sorted."""
    from tokenmill.model import quantization  # noqa: F401  (registers the built-in methods)

    return sorted(_REGISTRY)


def get_quantization_config_class(name: str) -> type[QuantizationConfig]:
    names = quantization_methods()
    if name not in _REGISTRY:
        raise ValueError(f"quantization={name!r} is not supported: use one of {', '.join(names)}")
    return _REGISTRY[name]
