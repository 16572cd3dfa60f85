"""tokenmill: an LLM inference engine with a paged KV cache and continuous batching, and a capacity planner.

The public names are imported on first use, so `tokenmill.planner` stays importable without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tokenmill.worker.cpu_threads import configure_openmp_env

# Before anything loads torch (and its OpenMP runtime, which reads the environment once): waiting OpenMP
# threads sleep instead of spinning, which keeps generation fast on a CPU shared with other processes.
configure_openmp_env()

if TYPE_CHECKING:
    from tokenmill.entrypoints.llm import LLM
    from tokenmill.outputs import (
        CompletionOutput,
        EmbeddingOutput,
        EmbeddingRequestOutput,
        Logprob,
        RequestOutput,
    )
    from tokenmill.pooling_params import PoolingParams
    from tokenmill.sampling_params import SamplingParams
    from tokenmill.structured_output.params import StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "PoolingParams",
           "EmbeddingRequestOutput", "EmbeddingOutput", "StructuredOutputsParams"]
__version__ = "0.1.0"

# public name -> module defining it
_EXPORTS = {
    "LLM": "tokenmill.entrypoints.llm",
    "SamplingParams": "tokenmill.sampling_params",
    "RequestOutput": "tokenmill.outputs",
    "CompletionOutput": "tokenmill.outputs",
    "Logprob": "tokenmill.outputs",
    "PoolingParams": "tokenmill.pooling_params",
    "EmbeddingRequestOutput": "tokenmill.outputs",
    "EmbeddingOutput": "tokenmill.outputs",
    "StructuredOutputsParams": "tokenmill.structured_output.params",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
