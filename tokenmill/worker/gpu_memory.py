"""Sizing the KV cache on a GPU by measuring, as vLLM does, and setting the measure beside the planner's model.

After the weights are loaded and before the KV cache exists, one dummy forward over max_num_batched_tokens
tokens (plus the logits and softmax of min(max_num_batched_tokens, max_num_seqs) sampled rows) gives the
activation peak. Then

    num_blocks = (total * gpu_memory_utilization - weights - activation_peak - non_torch) // bytes_per_block

  total            torch.cuda.mem_get_info()[1]
  weights          torch.cuda.memory_allocated() before the dummy forward (parameters and buffers)
  activation_peak  torch.cuda.max_memory_allocated() during it, minus weights
  non_torch        memory in use on the device that PyTorch's allocator does not hold: the CUDA context,
                   cuBLAS/Triton modules, other processes (total - free - memory_reserved, after the forward)
  bytes_per_block  tokenmill.planner.kv_cache_bytes_per_block: num_layers * 2 * block_size * kv_heads *
                   head_dim * dtype bytes

The returned MemoryProfile carries the planner's prediction for the same settings (weight_bytes,
activation_peak_bytes, overhead_bytes), so the engine logs measured and predicted side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from tokenmill.attention.backend import AttentionMetadata

if TYPE_CHECKING:
    from tokenmill.model.llama import LlamaForCausalLM

logger = logging.getLogger("tokenmill")

GiB = 2**30


def num_blocks_for_budget(total_bytes: int, gpu_memory_utilization: float, weights_bytes: int,
                          activation_peak_bytes: int, non_torch_bytes: int, bytes_per_block: int) -> int:
    """KV blocks that fit in what gpu_memory_utilization leaves after weights, activations and other memory."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if bytes_per_block <= 0:
        raise ValueError(f"bytes_per_block must be positive, got {bytes_per_block}")
    budget = int(total_bytes * gpu_memory_utilization)
    free_for_kv = budget - weights_bytes - activation_peak_bytes - non_torch_bytes
    num_blocks = free_for_kv // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"no KV cache block fits: {gpu_memory_utilization:.0%} of {total_bytes / GiB:.1f} GiB is "
            f"{budget / GiB:.2f} GiB, of which weights take {weights_bytes / GiB:.2f}, activations "
            f"{activation_peak_bytes / GiB:.2f} and other memory {non_torch_bytes / GiB:.2f} GiB, and one block "
            f"needs {bytes_per_block} bytes: raise gpu_memory_utilization, lower max_num_batched_tokens, "
            "or use a smaller model or dtype"
        )
    return num_blocks


@dataclass(frozen=True)
class MemoryProfile:
    """What the profile measured, the KV cache it sized, and the planner's prediction for the same settings."""

    total_bytes: int
    gpu_memory_utilization: float
    weights_bytes: int
    activation_peak_bytes: int
    non_torch_bytes: int
    bytes_per_block: int
    block_size: int
    num_blocks: int
    max_num_batched_tokens: int
    # The planner's numbers (None when the model's architecture could not be read by the planner).
    planned_weights_bytes: int | None = None
    planned_activation_peak_bytes: int | None = None
    planned_overhead_bytes: int | None = None
    planned_num_blocks: int | None = None

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def as_dict(self) -> dict:
        return asdict(self) | {"kv_cache_bytes": self.kv_cache_bytes}

    def log_line(self) -> str:
        def gib(x: int | None) -> str:
            return "?" if x is None else f"{x / GiB:.2f}"

        return (
            f"GPU memory ({gib(self.total_bytes)} GiB x {self.gpu_memory_utilization}): measured weights "
            f"{gib(self.weights_bytes)} GiB, activation peak {gib(self.activation_peak_bytes)} GiB at "
            f"{self.max_num_batched_tokens} tokens, non-torch {gib(self.non_torch_bytes)} GiB -> KV cache "
            f"{self.num_blocks} blocks ({gib(self.kv_cache_bytes)} GiB); planner predicted weights "
            f"{gib(self.planned_weights_bytes)}, activations {gib(self.planned_activation_peak_bytes)}, "
            f"overhead {gib(self.planned_overhead_bytes)} GiB -> {self.planned_num_blocks} blocks"
        )


def dummy_prefill_inputs(num_tokens: int, num_seqs: int, block_size: int, device: torch.device | str,
                         ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """input_ids, positions and metadata of num_seqs prompts sharing num_tokens tokens, every one of them
    mapped to block 0 (slot 0): the profile runs against a one-block dummy cache, since its point is to
    measure what is left for the real one."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    lens = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    block_tables = torch.zeros((num_seqs, -(-max(lens) // block_size)), dtype=torch.int32, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    meta = AttentionMetadata.build(starts, lens, block_tables,
                                   torch.zeros(num_tokens, dtype=torch.int64, device=device))
    input_ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    return input_ids, positions, meta


@torch.inference_mode()
def run_dummy_forward(model: LlamaForCausalLM, num_kv_heads: int, head_dim: int, num_layers: int,
                      dtype: torch.dtype, device: torch.device, max_num_batched_tokens: int,
                      max_num_seqs: int, block_size: int) -> torch.Tensor:
    """The worst-case step: a forward over max_num_batched_tokens, then logits and softmax of the rows that
    sample (one per sequence, at most max_num_seqs), as the sampler does. Returns those probabilities
    [num_seqs, vocab_size] in float32."""
    input_ids, positions, meta = dummy_prefill_inputs(max_num_batched_tokens, max_num_seqs, block_size, device)
    cache = torch.zeros((2, 1, block_size, num_kv_heads, head_dim), dtype=dtype, device=device)
    # A later pipeline stage starts from the previous stage's activations: buffers of the same size stand in.
    intermediate = None if model.is_first_stage else model.empty_intermediate_tensors(len(input_ids), device)
    hidden = model(input_ids, positions, [cache] * num_layers, meta, intermediate)
    if not isinstance(hidden, torch.Tensor):  # not the last pipeline stage: it sends, never samples
        return hidden.hidden_states
    last_rows = [b - 1 for b in meta.query_start_loc_list[1:]]
    logits = model.compute_logits(hidden[last_rows])
    if logits is None:  # a tensor-parallel rank other than 0: rank 0 gathered the logits and samples
        return hidden[last_rows]
    return torch.softmax(logits.float(), dim=-1)  # the sampler's float32 copy when it samples


def measure_memory(run_forward: Callable[[], None], device: torch.device) -> tuple[int, int, int, int]:
    """(total, weights, activation_peak, non_torch) bytes around one call of run_forward on a CUDA device."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    weights = torch.cuda.memory_allocated(device)
    run_forward()
    torch.cuda.synchronize(device)
    activation_peak = torch.cuda.max_memory_allocated(device) - weights
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(0, (total - free) - torch.cuda.memory_reserved(device))
    torch.cuda.empty_cache()
    return total, weights, activation_peak, non_torch


def planner_prediction(hf_config: dict, dtype: torch.dtype, max_num_batched_tokens: int, max_num_seqs: int,
                       enforce_eager: bool) -> tuple[int, int, int] | None:
    """(weights, activation peak, fixed overhead) bytes the planner predicts; None if it cannot read the model."""
    try:
        from tokenmill.planner.arch import ModelArch
        from tokenmill.planner.memory import activation_peak_bytes, overhead_bytes, weight_bytes

        arch = ModelArch.from_hf_config(hf_config)
        weights = weight_bytes(arch, str(dtype).removeprefix("torch.")).total
        activations = activation_peak_bytes(arch, max_num_batched_tokens, dtype, max_num_seqs=max_num_seqs)
        overhead = overhead_bytes("gpu", enforce_eager=enforce_eager).total
    except (ImportError, ValueError, KeyError, TypeError) as e:
        logger.warning("the planner could not predict memory for this model (%s)", e)
        return None
    return weights, activations, overhead


def profile_kv_cache(
    model: LlamaForCausalLM,
    *,
    num_kv_heads: int,
    head_dim: int,
    num_layers: int,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    bytes_per_block: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    gpu_memory_utilization: float,
    hf_config: dict | None = None,
    enforce_eager: bool = False,
) -> MemoryProfile:
    """Profile one dummy forward on a CUDA device and size the KV cache; see the module docstring."""
    if device.type != "cuda":
        raise ValueError(f"memory profiling needs a CUDA device, got {device}: pass kv_cache_memory instead")

    def forward() -> None:
        run_dummy_forward(model, num_kv_heads, head_dim, num_layers, dtype, device, max_num_batched_tokens,
                          max_num_seqs, block_size)

    total, weights, activation_peak, non_torch = measure_memory(forward, device)
    num_blocks = num_blocks_for_budget(total, gpu_memory_utilization, weights, activation_peak, non_torch,
                                       bytes_per_block)
    planned = planner_prediction(hf_config, dtype, max_num_batched_tokens, max_num_seqs, enforce_eager) \
        if hf_config is not None else None
    planned_blocks = None
    if planned is not None:
        budget = int(total * gpu_memory_utilization) - sum(planned)
        planned_blocks = max(0, budget // bytes_per_block)
    profile = MemoryProfile(
        total_bytes=total, gpu_memory_utilization=gpu_memory_utilization, weights_bytes=weights,
        activation_peak_bytes=activation_peak, non_torch_bytes=non_torch, bytes_per_block=bytes_per_block,
        block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=max_num_batched_tokens,
        planned_weights_bytes=planned[0] if planned else None,
        planned_activation_peak_bytes=planned[1] if planned else None,
        planned_overhead_bytes=planned[2] if planned else None,
        planned_num_blocks=planned_blocks,
    )
    logger.info(profile.log_line())
    return profile
