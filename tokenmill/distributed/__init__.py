"""Process groups, parallel state and the collectives of tensor and pipeline parallelism (parallel_state.py)."""

from tokenmill.distributed.parallel_state import (
    CollectiveTime,
    GroupCoordinator,
    ParallelConfig,
    destroy_distributed,
    get_open_port,
    get_parallel_config,
    get_pp_group,
    get_pp_reverse_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    get_tp_group,
    get_world_group,
    init_distributed,
    output_rank,
    set_collective_timing,
    take_collective_time,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
    tensor_model_parallel_broadcast,
    tensor_model_parallel_gather,
)

__all__ = [
    "CollectiveTime", "GroupCoordinator", "ParallelConfig", "destroy_distributed", "get_open_port", "get_parallel_config",
    "get_pp_group", "get_pp_reverse_group", "get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size",
    "get_tp_group", "get_world_group", "init_distributed", "output_rank", "set_collective_timing",
    "take_collective_time", "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce", "tensor_model_parallel_broadcast", "tensor_model_parallel_gather",
]
