"""The grammar-backend interface: a library that compiles a specification for one tokenizer and makes
per-sequence matchers from the result. xgrammar_backend.py and guidance_backend.py implement it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokenmill.sample.logits_processor import LogitsProcessor
from tokenmill.structured_output.params import StructuredOutputsParams

if TYPE_CHECKING:
    from tokenmill.model.tokenizer import Tokenizer


class GrammarMatcherError(RuntimeError):
    """A matcher failed while computing a mask (a backend resource limit): its sequence cannot continue."""


class GrammarBackend(ABC):
    """Compiles specifications for one tokenizer and vocabulary.

    Construction is cheap; the backend's tokenizer tables are built on first compile (tens to hundreds of
    milliseconds), on the compile thread. compile() may be called from several threads at once.
    """

    name: ClassVar[str]

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        # The model's vocabulary (its lm_head width), which may exceed the tokenizer's (padding): the bitmask
        # covers every id the model can produce; ids past the tokenizer's are never allowed.
        self.vocab_size = vocab_size if vocab_size is not None else tokenizer.vocab_size
        if self.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"vocab_size {self.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens"
            )
        self.stop_token_ids: frozenset[int] = frozenset(tokenizer.eos_token_ids)
        if not self.stop_token_ids:
            raise ValueError(
                "structured outputs need an end-of-sequence token, and the tokenizer defines none (no eos_token "
                "in tokenizer_config.json, no eos_token_id in generation_config.json)"
            )

    @abstractmethod
    def unsupported_reason(self, params: StructuredOutputsParams) -> str | None:
        """Why this backend cannot enforce the specification exactly (cheap, no compile), or None."""

    @abstractmethod
    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """Compile; StructuredOutputError (naming the parameter) when the specification is rejected."""

    @abstractmethod
    def new_matcher(self, compiled: CompiledGrammar) -> GrammarMatcher:
        """A matcher at the start of the grammar."""


@dataclass(eq=False)
class CompiledGrammar:
    """A specification compiled for one tokenizer; shared (read-only) by every sequence that uses it."""

    backend: GrammarBackend
    spec_key: tuple[str, str, int]
    # The backend library's compiled object.
    handle: Any = field(repr=False)
    compile_time_s: float = 0.0

    def matcher(self) -> GrammarMatcher:
        """A new matcher for one sequence, at the start of the grammar."""
        return self.backend.new_matcher(self)


class GrammarMatcher(LogitsProcessor):
    """Restricts one sequence to a grammar: the sampler's LogitsProcessor for structured outputs.

    The end-of-sequence tokens are allowed exactly where the grammar accepts (is_completed()); once one is
    accepted the matcher is terminated and accepts nothing more. Subclasses wrap one backend's matcher.
    """

    uses_bitmask: ClassVar[bool] = True

    def __init__(self, compiled: CompiledGrammar):
        self.compiled = compiled
        self.stop_token_ids = compiled.backend.stop_token_ids
        self._token_ids: list[int] = []  # the accepted tokens, for rollback and recompute

    # -- backend hooks -----------------------------------------------------------------------------------------

    @abstractmethod
    def _accept(self, token_id: int) -> bool:
        """Advance the backend matcher; False, with its state unchanged, if the token is not allowed."""

    @abstractmethod
    def _fill(self, bitmask: torch.Tensor, row: int) -> None: ...

    @abstractmethod
    def _rollback(self, num_tokens: int) -> None: ...

    @abstractmethod
    def _reset(self) -> None: ...

    @abstractmethod
    def is_completed(self) -> bool:
        """Whether the tokens so far form a complete output: an end-of-sequence token is allowed now."""

    # -- LogitsProcessor ----------------------------------------------------------------------------------------

    @property
    def num_accepted_tokens(self) -> int:
        return len(self._token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self.is_terminated():
            # Nothing can follow; allow only the stop tokens so the row still has a valid distribution.
            bitmask[row].zero_()
            for token_id in self.stop_token_ids:
                bitmask[row, token_id // 32] |= _bit(token_id % 32)
            return
        self._fill(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        if self.is_terminated() or not 0 <= token_id < self.compiled.backend.vocab_size:
            return False
        if not self._accept(token_id):
            return False
        self._token_ids.append(token_id)
        return True

    def is_terminated(self) -> bool:
        return bool(self._token_ids) and self._token_ids[-1] in self.stop_token_ids

    def rollback(self, num_tokens: int) -> None:
        if not 0 <= num_tokens <= len(self._token_ids):
            raise ValueError(
                f"cannot roll back {num_tokens} tokens: the matcher has accepted {len(self._token_ids)}"
            )
        if num_tokens:
            self._rollback(num_tokens)
            del self._token_ids[-num_tokens:]

    def reset(self) -> None:
        self._reset()
        self._token_ids.clear()


def _bit(index: int) -> int:
    """The int32 word with only bit `index` set (bit 31 is the sign bit)."""
    return -(1 << 31) if index == 31 else 1 << index
