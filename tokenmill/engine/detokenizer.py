"""Incremental detokenization and stop strings for one output sequence."""

from __future__ import annotations

from typing import Protocol

from tokenmill.sampling_params import SamplingParams

# Prompt tokens kept as decoding context, so the first output token decodes with its leading space.
_CONTEXT_TOKENS = 6


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Text grows only by complete characters: a token ending inside a multi-byte UTF-8 character waits
    until the tokens completing it arrive."""

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        context = prompt_token_ids[-_CONTEXT_TOKENS:]
        self.ids: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""
        self.stop_strings = params.stop_strings
        self.include_stop = params.include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop_strings), default=0)

    def add_token(self, token_id: int) -> str | None:
        """Append a token; returns the stop string if the text now contains one (the text is cut before it)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return self._find_stop(len(delta))

    def _find_stop(self, delta_len: int) -> str | None:
        if not self.stop_strings:
            return None
        search_from = max(0, len(self.text) - delta_len - self.max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop_strings:
            idx = self.text.find(stop, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        self.text = self.text[: idx + len(stop)] if self.include_stop else self.text[:idx]
        return stop

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: while running, hold back what could still become the start of a stop string."""
        if finished or self.max_stop_len <= 1 or self.include_stop:
            return self.text
        return self.text[: max(0, len(self.text) - self.max_stop_len + 1)]
