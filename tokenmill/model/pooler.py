"""Pooling: one vector per prompt from the model's final normed hidden states (for /v1/embeddings, LLM.embed).

A pooling request is prefill-only. Its prompt may be computed in several chunks (chunked prefill), and again
after a preemption, so pooling runs in two halves: the model runner reduces each step's rows of the request
on the device (`pool_chunk`), and the request's `Pooler` folds those partial results together in prompt
order and finishes the vector once the whole prompt is in (`Pooler.result`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.pooling_params import PoolingParams


@dataclass
class PooledChunk:
    """The runner's reduction of one prefill chunk of a pooling request."""

    # The request's preemption count when the chunk was launched: a preempted request computes its prompt
    # again from position 0, maybe in other chunks, and its earlier chunks no longer add up with the new ones.
    epoch: int
    # Prompt positions [start, start + num_tokens) were computed in this chunk.
    start: int
    num_tokens: int
    # MEAN: the float32 sum of the chunk's hidden states; LAST: the last prompt token's hidden state, present
    # only in the chunk that holds it. [hidden_size]
    data: torch.Tensor | None


def pool_chunk(hidden: torch.Tensor, pooling_type: str, epoch: int, start: int, num_prompt_tokens: int
               ) -> PooledChunk:
    """hidden: [num_tokens, hidden_size], one request's rows of a step, for positions start.. of its prompt."""
    num_tokens = hidden.shape[0]
    if pooling_type == "MEAN":
        return PooledChunk(epoch, start, num_tokens, hidden.float().sum(dim=0))
    holds_last = start + num_tokens == num_prompt_tokens
    # A copy: the step's hidden states may be a CUDA graph's buffer, and a view would keep them alive.
    last = hidden[-1].to(torch.float32, copy=True) if holds_last else None
    return PooledChunk(epoch, start, num_tokens, last)


class Pooler:
    """One request's pooling state: its params (pooling type resolved) and the chunks folded so far."""

    def __init__(self, params: PoolingParams, num_prompt_tokens: int) -> None:
        if params.pooling_type is None:
            raise ValueError("a request's PoolingParams need a resolved pooling_type")
        self.params = params
        self.pooling_type: str = params.pooling_type
        self.num_prompt_tokens = num_prompt_tokens
        # Prompt positions folded in so far, the running value, and the epoch they belong to.
        self.num_pooled_tokens = 0
        self._value: torch.Tensor | None = None
        self._epoch = 0

    def add(self, chunk: PooledChunk) -> None:
        if chunk.epoch < self._epoch:
            return  # launched before a later preemption: the recomputation's chunks replace it
        if chunk.epoch > self._epoch:
            # The first chunk since a preemption: start over (a chunk in flight before it is still valid data,
            # but it is simpler and as cheap to keep one consistent computation).
            self._epoch, self._value, self.num_pooled_tokens = chunk.epoch, None, 0
        if self.pooling_type == "LAST":
            if chunk.data is not None:
                self._value = chunk.data
                self.num_pooled_tokens = self.num_prompt_tokens
            return
        if chunk.start != self.num_pooled_tokens or chunk.data is None:
            raise RuntimeError(f"pooled chunk at position {chunk.start} does not follow the {self.num_pooled_tokens} "
                               "positions already pooled")
        self._value = chunk.data if self._value is None else self._value + chunk.data
        self.num_pooled_tokens += chunk.num_tokens

    @property
    def done(self) -> bool:
        return self._value is not None and self.num_pooled_tokens == self.num_prompt_tokens

    def result(self) -> torch.Tensor:
        """The pooled vector [hidden_size], float32, on the host."""
        if not self.done or self._value is None:
            raise RuntimeError(f"pooling is not finished: {self.num_pooled_tokens} of {self.num_prompt_tokens} "
                               "prompt positions are in")
        value = self._value / self.num_prompt_tokens if self.pooling_type == "MEAN" else self._value
        if self.params.normalize:
            value = F.normalize(value, p=2.0, dim=-1)
        return value.cpu()
