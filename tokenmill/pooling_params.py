"""Options of a pooling (embedding) request, named as vLLM's: one vector per prompt instead of generated text."""

from __future__ import annotations

from dataclasses import dataclass

# vLLM's names: LAST takes the final token's hidden state (decoder embedding models are trained for it),
# MEAN averages the hidden states of every prompt token.
POOLING_TYPES = ("LAST", "MEAN")


@dataclass(frozen=True)
class PoolingParams:
    # None: the engine's pooling type (--pooling-type, LAST by default).
    pooling_type: str | None = None
    # Scale the pooled vector to unit L2 norm (so a dot product is the cosine similarity).
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type is not None:
            object.__setattr__(self, "pooling_type", check_pooling_type(self.pooling_type))
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True or False, got {self.normalize!r}")


def check_pooling_type(value: str) -> str:
    name = str(value).upper()
    if name not in POOLING_TYPES:
        raise ValueError(f"pooling_type={value!r} is not supported: use one of {', '.join(POOLING_TYPES)}")
    return name
