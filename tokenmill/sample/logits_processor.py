"""Logits processors: per-sequence state that restricts or adjusts next-token logits before sampling and
advances with each accepted token. The sampler drives them all through one mechanism; penalties, min_tokens
and grammar matchers (tokenmill/structured_output/) are the built-in kinds, so the sampler has no special
case per feature.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from tokenmill.sampling_params import SamplingParams
    from tokenmill.structured_output.backend import GrammarMatcher


class LogitsProcessor(ABC):
    """One sequence's logits processor.

    Contract with the sampler, per step, for each row of the batch that has processors:

    1. Before sampling, the row's logits are restricted or adjusted:
       - a processor with `uses_bitmask = True` only forbids tokens. The sampler gives every such row a row of
         one int32 token bitmask ([batch, ceil(vocab_size / 32)], bit j of word i set = token 32*i + j allowed,
         see tokenmill/structured_output/bitmask.py), calls `fill_bitmask(bitmask, row)`, then applies all rows
         at once with one kernel (`apply_token_bitmask_`). This is what keeps masking cheap: one pass over the
         logits, not one per row. Bitmask rows are filled before any other processor runs, and applied after;
       - every other processor kind gets one call per step for all its rows: `apply_batch(logits, rows,
         processors, batch)` (vectorised over the rows; the default calls `apply(logits[row])` per row).
    2. Once the sampled token is final (after any async step is collected), `accept_token(token_id)`. It returns
       False when the processor cannot accept the token; its state is then unchanged, and the sequence fails
       (a masked token can only be sampled through a bug or a token forced from outside).
    3. `is_terminated()` says that the processor can accept nothing more (a grammar matcher has accepted its
       stop token): the sequence must finish.
    4. A preempted sequence is recomputed with new processors, which accept its output tokens again in order
       (replay). `reset()` returns a processor to its initial state; `rollback(n)` undoes the last n accepted
       tokens (speculative decoding, a stop string that ends mid-token).

    `needs_output_tokens` says whether the processor must see each sampled token on the host before the next
    step's logits can be processed: with async scheduling, a batch holding such a processor waits for the
    previous step's tokens instead of reading them on the device.

    Processors are not thread-safe: one thread (the engine's step) drives a processor at a time.
    """

    # True when the processor only forbids tokens, through fill_bitmask; False when it changes logit values,
    # through apply_batch / apply.
    uses_bitmask: ClassVar[bool] = False
    # True when the next step's masking depends on the token sampled by this one (see the class docstring).
    needs_output_tokens: ClassVar[bool] = True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32, [batch, ceil(vocab_size / 32)], on CPU)."""
        raise NotImplementedError(f"{type(self).__name__} does not restrict tokens through a bitmask")

    def apply(self, logits: torch.Tensor) -> None:
        """Restrict or adjust one row of next-token logits ([vocab_size]) in place.

        The default fills a one-row bitmask and applies it: correct for bitmask processors, but the sampler
        batches them through fill_bitmask instead.
        """
        from tokenmill.structured_output.bitmask import allocate_token_bitmask, apply_token_bitmask_

        if not self.uses_bitmask:
            raise NotImplementedError(f"{type(self).__name__} must implement apply() or apply_batch()")
        bitmask = allocate_token_bitmask(1, logits.shape[-1])
        self.fill_bitmask(bitmask, 0)
        apply_token_bitmask_(logits.view(1, -1), bitmask)

    @classmethod
    def apply_batch(cls, logits: torch.Tensor, rows: Sequence[int], processors: Sequence[LogitsProcessor],
                    batch: BatchMasks) -> torch.Tensor:
        """Apply processors[i] (all of this class) to logits[rows[i]]; returns the logits (the same tensor
        changed in place, or a new one). logits: [batch, vocab] float32, this step's own copy."""
        for row, processor in zip(rows, processors, strict=True):
            processor.apply(logits[row])
        return logits

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


class BatchMasks:
    """What the sampler knows about the batch's bitmask rows while the other processors run: the filled
    bitmask ([batch, words] int32) and which rows a bitmask processor filled."""

    def __init__(self, bitmask: torch.Tensor | None = None, rows: Sequence[int] = ()) -> None:
        self.bitmask = bitmask
        self.rows = frozenset(rows)

    def allows_only(self, row: int, token_ids: Sequence[int]) -> bool:
        """Whether the row's bitmask forbids every token outside token_ids (False for a row without one)."""
        if self.bitmask is None or row not in self.rows:
            return False
        words = self.bitmask[row].clone()
        for token_id in token_ids:
            if token_id // 32 < words.shape[0]:
                words[token_id // 32] &= ~_bit(token_id % 32)
        return not bool(words.any())


def _bit(index: int) -> int:
    """The int32 word with only bit `index` set (bit 31 is the sign bit)."""
    return -(1 << 31) if index == 31 else 1 << index


class _TokenHistory(LogitsProcessor):
    """A processor whose state is the list of accepted tokens."""

    def __init__(self) -> None:
        self.output_token_ids: list[int] = []

    def accept_token(self, token_id: int) -> bool:
        self.output_token_ids.append(token_id)
        return True

    def rollback(self, num_tokens: int) -> None:
        if not 0 <= num_tokens <= len(self.output_token_ids):
            raise ValueError(f"cannot roll back {num_tokens} tokens: {len(self.output_token_ids)} were accepted")
        del self.output_token_ids[len(self.output_token_ids) - num_tokens :]

    def reset(self) -> None:
        self.output_token_ids.clear()


class PenaltiesProcessor(_TokenHistory):
    """Repetition, frequency and presence penalties (vLLM's semantics): frequency and presence count the
    output tokens; repetition shrinks the logit of every token seen in the prompt or the output."""

    def __init__(self, params: SamplingParams, prompt_token_ids: Sequence[int]) -> None:
        super().__init__()
        self.repetition_penalty = params.repetition_penalty
        self.frequency_penalty = params.frequency_penalty
        self.presence_penalty = params.presence_penalty
        # The distinct prompt tokens, for the repetition penalty (built once, not per step).
        self.prompt_ids: torch.Tensor | None = (
            torch.tensor(sorted(set(prompt_token_ids)), dtype=torch.long) if self.repetition_penalty != 1.0
            else None
        )

    @classmethod
    def apply_batch(cls, logits: torch.Tensor, rows: Sequence[int], processors: Sequence[LogitsProcessor],
                    batch: BatchMasks) -> torch.Tensor:
        procs: list[PenaltiesProcessor] = list(processors)  # type: ignore[arg-type]
        device = logits.device
        vocab = logits.shape[1]
        num = len(rows)
        # One scatter for every row's output tokens: counts[i, token] = occurrences in row i's output.
        row_of_token = [i for i, p in enumerate(procs) for _ in p.output_token_ids]
        counts = torch.zeros(num, vocab, device=device)  # [num, vocab]
        if row_of_token:
            tokens = [t for p in procs for t in p.output_token_ids]
            counts.index_put_((torch.tensor(row_of_token, device=device), torch.tensor(tokens, device=device)),
                              torch.ones(len(tokens), device=device), accumulate=True)
        seen = counts > 0
        with_prompt = [(i, p.prompt_ids) for i, p in enumerate(procs) if p.prompt_ids is not None]
        if with_prompt:
            prompt_rows = torch.cat([torch.full((len(ids),), i) for i, ids in with_prompt]).to(device)
            prompt_cols = torch.cat([ids for _, ids in with_prompt]).to(device)
            seen = seen.clone()
            seen[prompt_rows, prompt_cols] = True
        index = torch.tensor(list(rows), device=device)
        sub = logits.index_select(0, index)  # [num, vocab]
        rep = torch.tensor([p.repetition_penalty for p in procs], device=device)[:, None]
        freq = torch.tensor([p.frequency_penalty for p in procs], device=device)[:, None]
        pres = torch.tensor([p.presence_penalty for p in procs], device=device)[:, None]
        # Repetition penalty (CTRL paper): shrink the logits of every token already seen, whatever its sign.
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * counts - pres * (counts > 0).float()
        logits[index] = sub
        return logits


class MinTokensProcessor(_TokenHistory):
    """Forbids the end-of-sequence and stop tokens until min_tokens tokens were generated.

    Under a grammar that allows nothing but a stop token (a complete JSON value, say), the grammar wins: the
    stop tokens are not masked and the sequence ends with fewer than min_tokens tokens (vLLM does the same);
    masking them would leave no token to sample."""

    def __init__(self, params: SamplingParams, eos_token_ids: Sequence[int]) -> None:
        super().__init__()
        self.min_tokens = params.min_tokens
        banned = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            banned |= set(eos_token_ids)
        self.banned_token_ids = sorted(banned)

    @property
    def is_active(self) -> bool:
        return len(self.output_token_ids) < self.min_tokens

    @classmethod
    def apply_batch(cls, logits: torch.Tensor, rows: Sequence[int], processors: Sequence[LogitsProcessor],
                    batch: BatchMasks) -> torch.Tensor:
        vocab = logits.shape[1]
        mask_rows, mask_cols = [], []
        for row, p in zip(rows, processors, strict=True):
            assert isinstance(p, MinTokensProcessor)
            if not p.is_active or batch.allows_only(row, p.banned_token_ids):
                continue
            for token_id in p.banned_token_ids:
                if token_id < vocab:
                    mask_rows.append(row)
                    mask_cols.append(token_id)
        if mask_rows:
            logits[mask_rows, mask_cols] = float("-inf")
        return logits


def logits_processor_classes(params: SamplingParams) -> list[type[LogitsProcessor]]:
    """The kinds of processor a request with these params gets, in the order they run (the grammar's bitmask
    is applied last, whatever its place here)."""
    from tokenmill.structured_output.backend import GrammarMatcher

    classes: list[type[LogitsProcessor]] = []
    if params.needs_penalties:
        classes.append(PenaltiesProcessor)
    if params.min_tokens > 0:
        classes.append(MinTokensProcessor)
    if params.structured_outputs is not None:
        classes.append(GrammarMatcher)  # type: ignore[type-abstract]  # concrete per backend
    return classes


def needs_output_tokens(params: SamplingParams) -> bool:
    """Whether a request's processors need each sampled token on the host before the next step."""
    return any(cls.needs_output_tokens for cls in logits_processor_classes(params))


def build_logits_processors(params: SamplingParams, prompt_token_ids: Sequence[int],
                            eos_token_ids: Sequence[int], grammar: GrammarMatcher | None = None
                            ) -> list[LogitsProcessor]:
    """One sequence's processors, fresh (they have accepted nothing). grammar: the sequence's matcher, required
    exactly when params ask for structured outputs."""
    from tokenmill.structured_output.backend import GrammarMatcher

    processors: list[LogitsProcessor] = []
    for cls in logits_processor_classes(params):
        if cls is PenaltiesProcessor:
            processors.append(PenaltiesProcessor(params, prompt_token_ids))
        elif cls is MinTokensProcessor:
            processors.append(MinTokensProcessor(params, eos_token_ids))
        elif cls is GrammarMatcher:
            if grammar is None:
                raise ValueError("a request with structured_outputs needs its grammar matcher")
            processors.append(grammar)
    return processors
