"""The engine's memory per rank beside the planner's prediction for that rank, logged once at start-up.

The worker reports what it allocated (Worker.engine_facts: weight_bytes, kv_cache_bytes); the planner predicts
the same rank from the architecture, the dtype and the quantization methods (engine_weight_bytes) and from the
KV block layout (kv_cache_bytes_per_block) of the rank's tensor-parallel share and pipeline stage. A mismatch
means the planner's model of the engine is stale, and its plans would be off by as much: it is logged as a
warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.planner.arch import ModelArch
from tokenmill.planner.memory import MiB, engine_weight_bytes, kv_cache_bytes_per_block

logger = logging.getLogger("tokenmill")

# Relative difference above which measured and planned bytes are said to disagree.
AGREEMENT_TOLERANCE = 0.01


@dataclass(frozen=True)
class RankMemory:
    """One rank's measured bytes and the planner's prediction. rank = pipeline_stage * tp + tensor_parallel_rank,
    vLLM's numbering. Measured values are None when the worker did not report them."""

    rank: int
    tensor_parallel_rank: int
    pipeline_stage: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    num_blocks: int
    weight_bytes: int | None
    planned_weight_bytes: int
    kv_cache_bytes: int | None
    planned_kv_cache_bytes: int

    def agrees(self, tolerance: float = AGREEMENT_TOLERANCE) -> bool:
        """Whether every reported measure is within ``tolerance`` (relative) of its prediction."""
        pairs = ((self.weight_bytes, self.planned_weight_bytes), (self.kv_cache_bytes, self.planned_kv_cache_bytes))
        return all(m is None or abs(m - p) <= tolerance * max(p, 1) for m, p in pairs)

    def log_line(self) -> str:
        def mib(n: int | None) -> str:
            return "not reported" if n is None else f"{n / MiB:.2f} MiB"

        return (
            f"per-rank memory: rank {self.rank} (tp rank {self.tensor_parallel_rank}/{self.tensor_parallel_size}, "
            f"pp stage {self.pipeline_stage}/{self.pipeline_parallel_size}): weights {mib(self.weight_bytes)} "
            f"(planned {mib(self.planned_weight_bytes)}), KV cache {mib(self.kv_cache_bytes)} "
            f"(planned {mib(self.planned_kv_cache_bytes)}, {self.num_blocks} blocks)"
        )


def planned_rank_memory(
    arch: ModelArch,
    dtype: object,
    quant_config: Any | None,
    block_size: int,
    num_blocks: int,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    pipeline_stage: int = 0,
    device_type: str = "cpu",
) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) the planner predicts for one rank of the engine holding ``num_blocks`` KV
    blocks of ``block_size`` tokens in ``dtype`` on a ``device_type`` ("cpu" or "cuda") device."""
    weights = engine_weight_bytes(
        arch, dtype, quant_config, tensor_parallel_size, pipeline_parallel_size, pipeline_stage, device_type
    )
    per_block = kv_cache_bytes_per_block(
        arch, block_size, dtype, tensor_parallel_size, pipeline_parallel_size, pipeline_stage
    )
    return weights, num_blocks * per_block


def log_rank_memory(
    config: Any, model_dir: Path, facts: dict[str, Any] | list[dict[str, Any]], num_blocks: int
) -> list[RankMemory]:
    """Log one line per rank of ``facts`` (Worker.engine_facts of each rank, or of the one rank) with the
    planner's prediction beside it, for an engine of ``config`` (a resolved EngineConfig) over ``model_dir``.
    Returns the records."""
    from tokenmill.model.loader import read_hf_config
    from tokenmill.model.quantization import resolve_quantization

    tp = int(getattr(config, "tensor_parallel_size", 1))
    pp = int(getattr(config, "pipeline_parallel_size", 1))
    per_rank = facts if isinstance(facts, list) else [facts]
    ranks = [int(rank_facts.get("rank", index)) for index, rank_facts in enumerate(per_rank)]
    records: list[RankMemory] = []
    try:
        hf_config = read_hf_config(model_dir)
        arch = ModelArch.from_hf_config(hf_config)
        quant_config = resolve_quantization(hf_config, config.model.quantization,
                                            str(Path(model_dir) / "config.json"))
        predictions = [
            planned_rank_memory(arch, config.model.dtype, quant_config, config.cache.block_size, num_blocks, tp, pp,
                                rank // tp, str(rank_facts.get("device", "cpu")).split(":")[0])
            for rank, rank_facts in zip(ranks, per_rank, strict=True)
        ]
    except (ValueError, KeyError, NotImplementedError) as e:  # a start-up log never stops the engine
        logger.warning("per-rank memory: the planner cannot predict this engine's memory (%s)", e)
        return records
    for rank, rank_facts, (weights, kv) in zip(ranks, per_rank, predictions, strict=True):
        stage, tp_rank = divmod(rank, tp)
        record = RankMemory(
            rank=rank,
            tensor_parallel_rank=tp_rank,
            pipeline_stage=stage,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            num_blocks=num_blocks,
            weight_bytes=rank_facts.get("weight_bytes"),
            planned_weight_bytes=weights,
            kv_cache_bytes=rank_facts.get("kv_cache_bytes"),
            planned_kv_cache_bytes=kv,
        )
        if record.agrees():
            logger.info("%s", record.log_line())
        else:
            logger.warning("%s: the planner's memory model disagrees with this engine by more than %.0f%%",
                           record.log_line(), AGREEMENT_TOLERANCE * 100)
        records.append(record)
    return records
