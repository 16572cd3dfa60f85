"""A linear layer (and an embedding table) whose weight storage and kernel come from a LinearMethod chosen at
construction: full precision, int8, int4, GGUF blocks, ... (tokenmill/model/quantization).

Tensor parallelism (a TensorParallelShard given at construction): a column-parallel layer holds some rows of
its weight (its heads, its slice of the MLP or of the vocabulary) and computes those outputs only; a
row-parallel layer holds a slice of its inputs' columns, and its partial products are summed over the ranks
(an all-reduce), the bias added once after the sum. The layer's in_features / out_features / output_sizes are
its own rank's; the loader narrows each checkpoint tensor to the rank's part through its LinearMethod.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.distributed import tensor_model_parallel_all_reduce
from tokenmill.kernels.cpu.quant import Int4Weight, Int8Weight
from tokenmill.model.quantization.base import LinearMethod, make_param, set_weight_attrs, weight_loader_of
from tokenmill.model.quantization.unquantized import UnquantizedLinearMethod


def resident_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a module holds itself (not its children's): parameters, buffers, and what its quantization
    method keeps as plain attributes (packed weights, objects with a tensors() method)."""
    found = [p for p in module.parameters(recurse=False)] + [b for b in module.buffers(recurse=False)]
    for value in module.__dict__.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, torch.Tensor) and not isinstance(item, nn.Parameter):
                found.append(item)
            elif hasattr(item, "tensors") and callable(item.tensors):
                found.extend(item.tensors())
    return found


def tensor_bytes(t: torch.Tensor) -> tuple[int, int]:
    """(identity, bytes) of the memory behind t: its storage, or t itself for opaque (oneDNN) tensors."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return id(t), t.numel() * t.element_size()


@dataclass(frozen=True)
class TensorParallelShard:
    """The part of a layer's checkpoint weight one tensor-parallel rank holds.

    kind "column": for each shard of the (fused) layer, the rows [start, start + size) of its checkpoint tensor
    (rows past the checkpoint's end are zeros: a vocabulary padded to a multiple of the ranks); kind "row": the
    input columns [start, start + size), one range; the partial outputs are all-reduced."""

    kind: str  # "column" or "row"
    ranges: tuple[tuple[int, int], ...]  # (start, size): one per shard (column), one in all (row)
    tensor_parallel_size: int
    full_in_features: int  # the checkpoint's, before the split (the errors' figures)

    def __post_init__(self) -> None:
        if self.kind not in ("column", "row"):
            raise ValueError(f"kind must be 'column' or 'row', got {self.kind!r}")


class Linear(nn.Module):
    """y = x @ W.T (+ bias) with W [out_features, in_features] held by `quant_method`.

    A fused projection (q/k/v, gate/up) lists its parts' rows in output_sizes; the loader then fills shard i with
    load_weight(name, tensor, shard_id=i). With tp_shard the layer is one rank's part of a tensor-parallel layer
    (see TensorParallelShard); its sizes are the rank's.
    """

    # What the quantization methods keep on the layer (each is set only by the methods that use it):
    weight: torch.Tensor | None  # the checkpoint-layout weight; None once repacked into a kernel's layout
    bias: torch.Tensor | None
    onednn_weight: torch.Tensor | None  # unquantized: the bfloat16 weight pre-packed for oneDNN, if it was
    qweight: torch.Tensor | Int8Weight | Int4Weight  # a checkpoint's packed tensor, then its kernel object
    qweights: list[Int4Weight | Int8Weight]  # gguf: one kernel per run of same-kind shards
    gguf_dtype: torch.dtype  # gguf: the model's dtype, for embedding rows
    is_embedding: bool  # set on embedding tables (VocabEmbedding)
    is_tied_output: bool  # set on an embedding table that is also the lm_head (TiedLMHead)

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant_method: LinearMethod | None = None, output_sizes: Sequence[int] | None = None,
                 dtype: torch.dtype | None = None, prefix: str = "",
                 tp_shard: TensorParallelShard | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.output_sizes = list(output_sizes) if output_sizes is not None else [out_features]
        if sum(self.output_sizes) != out_features:
            raise ValueError(f"{prefix}: output_sizes {self.output_sizes} do not add up to {out_features}")
        self.prefix = prefix
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.tp_shard = tp_shard
        if tp_shard is not None:
            check_tensor_parallel_split(self.quant_method, tp_shard, in_features, prefix)
        dtype = dtype or torch.get_default_dtype()
        self.quant_method.create_weights(self, in_features, self.output_sizes, dtype)
        if bias:
            param = make_param(self, "bias", (out_features,), dtype, self.output_sizes)
            if param.device.type != "meta":
                nn.init.zeros_(param)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shard = self.tp_shard
        if shard is not None and shard.kind == "row" and shard.tensor_parallel_size > 1:
            # Each rank's inputs are its slice of the columns: the partial products add up over the ranks.
            out = tensor_model_parallel_all_reduce(self.quant_method.apply(self, x, None))
            return out + self.bias if self.bias is not None else out
        return self.quant_method.apply(self, x, self.bias)

    def load_weight(self, name: str, tensor: torch.Tensor, shard_id: int | None = None) -> None:
        """Copy checkpoint tensor `name` (weight, bias, qweight, scales, ...) into its parameter (a tensor-parallel
        layer: the rank's part of it); ValueError saying what is wrong (the caller adds the tensor's name)."""
        param = self._parameters.get(name)
        if param is None:
            raise ValueError(f"has no place in {self.prefix or 'this layer'} (quantized as "
                             f"{type(self.quant_method).__name__})")
        shard = self.tp_shard
        if shard is not None and shard.tensor_parallel_size > 1:
            if shard.kind == "column":
                start, size = shard.ranges[shard_id or 0]
                tensor = self.quant_method.narrow_checkpoint_tensor(self, name, tensor, "output", start, size)
            else:
                start, size = shard.ranges[0]
                tensor = self.quant_method.narrow_checkpoint_tensor(self, name, tensor, "input", start, size)
        set_weight_attrs(param, **self.__dict__.get("param_attrs", {}).get(name, {}))
        weight_loader_of(param)(param, tensor, shard_id)

    def loaded_weight(self) -> torch.Tensor:
        """The weight in its checkpoint layout (RuntimeError once the method has repacked it)."""
        if self.weight is None:
            raise RuntimeError(f"{self.prefix or 'this layer'}: the weight was repacked by "
                               f"{type(self.quant_method).__name__}; its checkpoint layout is gone")
        return self.weight

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"method={type(self.quant_method).__name__}")


def check_tensor_parallel_split(method: LinearMethod, shard: TensorParallelShard, in_features: int,
                                prefix: str) -> None:
    """ValueError naming the layer when its quantization method cannot hold one rank's part of it: a format
    without tensor-parallel loading, or (row-parallel) an input slice that cuts through its blocks or groups;
    the message lists the sizes that split this layer."""
    tp = shard.tensor_parallel_size
    name = type(method).__name__
    if not method.supports_tensor_parallel:
        raise ValueError(f"{prefix}: {name} weights cannot be split over tensor-parallel ranks: use "
                         "tensor_parallel_size=1")
    if shard.kind != "row":
        return
    unit = method.input_split_unit(in_features)
    full = shard.full_in_features
    if in_features % unit:
        valid = [t for t in range(1, max(8, tp) + 1) if full % t == 0 and (full // t) % method.input_split_unit(
            full // t) == 0]
        raise ValueError(
            f"{prefix}: its {full} inputs split over tensor_parallel_size={tp} give {in_features} per rank, which "
            f"cuts through the {unit}-input blocks of its {name} weights{method.input_split_note()}: sizes that split this layer are "
            f"{', '.join(map(str, valid))}"
        )


class VocabEmbedding(Linear):
    """An embedding table [num_embeddings, embedding_dim] stored by a LinearMethod: forward(ids) looks rows up,
    and a tied lm_head multiplies by the same storage (TiedLMHead).

    Vocabulary-parallel (tp_shard, column kind): the rank holds rows [vocab_start, vocab_start + num_embeddings)
    of the table (the vocabulary padded to a multiple of the ranks; padded rows are zeros); a lookup reads the
    ids in its range, zeros the others, and the ranks' rows are summed (all-reduce)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, quant_method: LinearMethod | None = None,
                 dtype: torch.dtype | None = None, prefix: str = "",
                 tp_shard: TensorParallelShard | None = None) -> None:
        self.is_embedding = True
        super().__init__(embedding_dim, num_embeddings, False, quant_method, dtype=dtype, prefix=prefix,
                         tp_shard=tp_shard)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start = tp_shard.ranges[0][0] if tp_shard is not None else 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        shard = self.tp_shard
        if shard is None or shard.tensor_parallel_size == 1:
            return self.quant_method.embedding(self, ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = self.quant_method.embedding(self, local.masked_fill(outside, 0))
        return tensor_model_parallel_all_reduce(rows.masked_fill_(outside.unsqueeze(-1), 0))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., embedding_dim] @ table.T -> [..., num_embeddings]."""
        return self.quant_method.apply(self, x, None)


class TiedLMHead(nn.Module):
    """The output projection of a model whose lm_head is its embedding table (no weight of its own)."""

    def __init__(self, embedding: VocabEmbedding) -> None:
        super().__init__()
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self._embedding = [embedding]  # not a submodule: its parameters are counted once, under embed_tokens
        embedding.is_tied_output = True  # its method may prepare the table for the output matmul too

    @property
    def embedding(self) -> VocabEmbedding:
        """The embedding table this layer multiplies by (its weights and quantization method)."""
        return self._embedding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embedding[0].linear(x)
