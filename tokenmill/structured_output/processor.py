"""The per-request logits-processor contract the sampler drives.

A logits processor belongs to one sequence (a request with n > 1 has one per sample). Before each sampling
step it may restrict or adjust that sequence's next-token logits; after the step it advances its state with
the token the sequence accepted. Grammar matchers (matcher.py) are one kind; penalties and min_tokens are
meant to become others, so the sampler needs no special case per feature.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class LogitsProcessor(ABC):
    """One sequence's logits processor.

    Contract with the sampler, per step, for each row of the batch that has processors:

    1. Before sampling, the row's logits are restricted or adjusted:
       - a processor with `uses_bitmask = True` only forbids tokens. The sampler gives every such row a row of
         one int32 token bitmask ([batch, ceil(vocab_size / 32)], bit j of word i set = token 32*i + j allowed,
         see bitmask.py), calls `fill_bitmask(bitmask, row)`, then applies all rows at once with one kernel
         (`apply_token_bitmask_`). This is what keeps masking cheap: one pass over the logits, not one per row;
       - any other processor gets `apply(logits)` with its row ([vocab_size] float, modified in place).
    2. Once the sampled token is final (after rejection of speculative tokens, after any async step is
       collected), `accept_token(token_id)`. It returns False when the processor cannot accept the token; its
       state is then unchanged, and the sampler must treat the sequence as failed (a masked token can only be
       sampled through a bug or a token forced from outside, e.g. a stop string cut).
    3. `is_terminated()` says that the processor can accept nothing more (a grammar matcher has accepted its
       stop token): the sequence must finish.
    4. When a preempted sequence is recomputed, `reset()` returns the processor to its initial state, and the
       sequence's output tokens are accepted again in order. `rollback(n)` undoes the last n accepted tokens
       (speculative decoding, a stop string that ends mid-token).

    Processors are not thread-safe: one thread (the engine's step) drives a processor at a time.
    """

    # True when the processor only forbids tokens, through fill_bitmask; False when it changes logit values,
    # through apply.
    uses_bitmask: ClassVar[bool] = False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32, [batch, ceil(vocab_size / 32)], on CPU)."""
        raise NotImplementedError(f"{type(self).__name__} does not restrict tokens through a bitmask")

    def apply(self, logits: torch.Tensor) -> None:
        """Restrict or adjust one row of next-token logits ([vocab_size]) in place.

        The default fills a one-row bitmask and applies it: correct for bitmask processors, but the sampler
        should batch them through fill_bitmask instead.
        """
        from tokenmill.structured_output.bitmask import allocate_token_bitmask, apply_token_bitmask_

        if not self.uses_bitmask:
            raise NotImplementedError(f"{type(self).__name__} must implement apply()")
        bitmask = allocate_token_bitmask(1, logits.shape[-1])
        self.fill_bitmask(bitmask, 0)
        apply_token_bitmask_(logits.view(1, -1), bitmask)

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance the state with the sequence's next token; False (state unchanged) if it is not allowed."""

    def is_terminated(self) -> bool:
        """Whether nothing more can be accepted: the sequence must finish."""
        return False

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepted tokens. ValueError if fewer were accepted."""

    @abstractmethod
    def reset(self) -> None:
        """Return to the state before the first accepted token."""
