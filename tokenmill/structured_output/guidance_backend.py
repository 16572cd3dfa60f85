"""The llguidance backend: grammars parsed lazily by an Earley parser over a token trie, so compiling is
near-instant and each mask costs ~0.1 ms per sequence. JSON schema (refusing keywords it does not implement
instead of ignoring them), regex, Lark and GBNF grammars.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.structured_output.backend import (
    CompiledGrammar,
    GrammarBackend,
    GrammarMatcher,
    GrammarMatcherError,
)
from tokenmill.structured_output.params import StructuredOutputError, StructuredOutputsParams

if TYPE_CHECKING:
    import llguidance

    from tokenmill.model.tokenizer import Tokenizer


class GuidanceBackend(GrammarBackend):
    name = "guidance"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None):
        super().__init__(tokenizer, vocab_size)
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's tokenizer, built from tokenizer.json (once; ~0.2 s for a 49k vocabulary)."""
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(
                    self.tokenizer.backend.to_str(),
                    n_vocab=self.vocab_size,
                    eos_token=sorted(self.stop_token_ids),
                )
            return self._ll_tokenizer

    def unsupported_reason(self, params: StructuredOutputsParams) -> str | None:
        if params.kind == "structural_tag":
            return "structural tags (tool calling) are compiled by the xgrammar backend only: use 'xgrammar' or 'auto'"
        return None  # llguidance itself refuses what it does not implement, when compiling

    def _grammar_text(self, params: StructuredOutputsParams) -> str:
        import llguidance

        kind = params.kind
        if kind in ("json", "json_object"):
            whitespace = params.json_whitespace
            options: dict[str, Any] = {"item_separator": ",", "key_separator": ":", "whitespace_flexible": False}
            if whitespace:
                options["whitespace_flexible"] = True
                options["whitespace_pattern"] = rf"[\x20\x0A\x0D\x09]{{0,{whitespace}}}"
            schema = params.closed_schema if kind == "json" else {"type": "object"}
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)  # type: ignore[arg-type]
            except ValueError as e:
                raise StructuredOutputError(f"structured_outputs.{kind}: {e}") from None
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(str(params.regex))
        if kind == "choice":
            assert params.choice is not None
            lark = "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
            return llguidance.LLMatcher.grammar_from_lark(lark)
        grammar = str(params.grammar)
        if "::=" in grammar:  # GBNF (llama.cpp's EBNF); llguidance runs it as Lark
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                grammar = gbnf_to_lark(grammar)
            except Exception as e:
                raise StructuredOutputError(
                    f"structured_outputs.grammar is not a valid GBNF grammar: {e}"
                ) from None
        return llguidance.LLMatcher.grammar_from_lark(grammar)

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        import llguidance

        reason = self.unsupported_reason(params)
        if reason is not None:
            raise StructuredOutputError(f"structured_outputs.{params.kind}: {reason}")
        ll_tokenizer = self.ll_tokenizer()
        start = time.perf_counter()
        grammar = self._grammar_text(params)
        # The matcher built here is the compiled form: each sequence gets a deep copy, which skips building
        # the grammar again.
        template = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if template.is_error():
            raise StructuredOutputError(
                f"structured_outputs.{params.kind}: the guidance backend rejects it: "
                f"{template.get_error().strip()}"
            )
        return CompiledGrammar(self, params.spec_key(), template, time.perf_counter() - start)

    def new_matcher(self, compiled: CompiledGrammar) -> GrammarMatcher:
        return GuidanceMatcher(compiled)


class GuidanceMatcher(GrammarMatcher):
    def __init__(self, compiled: CompiledGrammar):
        super().__init__(compiled)
        self._matcher: llguidance.LLMatcher = compiled.handle.deep_copy()
        self._stop_recorded = True  # whether llguidance counted the accepted stop token (see _accept)

    def _accept(self, token_id: int) -> bool:
        if token_id in self.stop_token_ids:
            # try_consume_tokens does not take the end-of-sequence token; consume_token does, where it is
            # allowed (checked first: a refused consume_token leaves the matcher in its terminal error state).
            if not self._matcher.is_accepting():
                return False
            # A matcher that had already stopped (nothing but the end can follow) does not record the token:
            # rolling it back is then a no-op for llguidance.
            self._stop_recorded = not self._matcher.is_stopped()
            return self._matcher.consume_token(token_id)
        # try_consume_tokens leaves the matcher usable when the token is refused.
        return self._matcher.try_consume_tokens([token_id]) == 1

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        words = bitmask[row]
        if not words.is_contiguous() or bitmask.dtype != torch.int32 or bitmask.device.type != "cpu":
            raise ValueError("the token bitmask must be a contiguous int32 CPU tensor")
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        if self._matcher.is_error():
            raise GrammarMatcherError(f"the guidance matcher failed: {self._matcher.get_error()}")

    def _rollback(self, num_tokens: int) -> None:
        if self.is_terminated() and not self._stop_recorded:
            num_tokens -= 1
        if num_tokens and not self._matcher.rollback(num_tokens):
            raise GrammarMatcherError(f"the guidance matcher failed to roll back: {self._matcher.get_error()}")

    def _reset(self) -> None:
        if not self._matcher.reset():
            raise GrammarMatcherError(f"the guidance matcher failed to reset: {self._matcher.get_error()}")

    def is_completed(self) -> bool:
        return bool(self._matcher.is_accepting())
