"""Incremental detokenization and stop strings for one output sequence."""

from __future__ import annotations

import codecs
from typing import Any, Protocol

from tokenizers.decoders import DecodeStream

from tokenmill.model.tokenizer import BYTE_FALLBACK, BYTE_LEVEL
from tokenmill.sampling_params import SamplingParams


class _Decoder(Protocol):
    @property
    def byte_decoding(self) -> str | None: ...

    def decode(
        self, ids: list[int], skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True
    ) -> str: ...

    def token_bytes(self, token_id: int) -> bytes | None: ...

    @property
    def all_special_ids(self) -> list[int]: ...


class IncrementalDetokenizer:
    """The text of one output sequence, grown token by token.

    Contract: the finished text equals tokenizer.decode(output token ids) with the request's
    skip_special_tokens and spaces_between_special_tokens (unless a stop string cut it), and every text shown
    before is a prefix of it. So the only text held back is text a later token could still change:
    - byte-level vocabularies (GPT-2 style): a valid but incomplete UTF-8 prefix at the end (at most 3 bytes).
      Invalid bytes (a lone continuation byte, a lead byte followed by a non-continuation) come out as U+FFFD
      at once, as decode() renders them;
    - byte-fallback vocabularies (SentencePiece style): decode() renders a run of <0xNN> tokens as its UTF-8
      text if the whole run is valid, else as one U+FFFD per byte. A run still open and valid so far is held;
      once invalid its U+FFFDs are final and shown.
    Each step decodes a short window of tokens (vLLM's prefix/read offsets), not the whole output: with
    tokenizers' DecodeStream where that is exact, else twice in Python.
    """

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: list[int], params: SamplingParams) -> None:
        # prompt_token_ids are not decoding context: the text must equal decode(output ids) on its own.
        del prompt_token_ids
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.spaces_between_special_tokens = params.spaces_between_special_tokens
        self.ids: list[int] = []
        # Window of the next decode: ids[prefix_offset:read_offset] is text already shown, rendered as
        # self._prefix_text (None: not decoded yet); text of ids[read_offset:] is new. self._ahead: characters
        # past the window's prefix already shown while the window could not move on (the text before an
        # incomplete character, the U+FFFDs of an open invalid byte run).
        self.prefix_offset = 0
        self.read_offset = 0
        self._prefix_text: str | None = ""
        self._ahead = 0
        self.text = ""
        self.stop_strings = params.stop_strings
        self.include_stop = params.include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop_strings), default=0)
        self._stopped = False
        self._flushed = False
        self._bytes_kind = tokenizer.byte_decoding
        # Tokens decode() drops: invisible to byte runs (bytes on both sides of one join).
        self._dropped = frozenset(tokenizer.all_special_ids) if self.skip_special_tokens else frozenset()
        # Bytes of a valid but incomplete UTF-8 character at the end (byte-level: since the last added token;
        # byte-fallback: of the open run of byte tokens), and for byte-fallback the run's length in bytes and
        # in characters, and whether it is invalid.
        self._token_bytes = tokenizer.token_bytes
        self._pending = b""
        self._run_len = 0
        self._run_chars = 0
        self._run_invalid = False
        self._new_text = False  # byte-level: this token's bytes completed text (characters or U+FFFD)
        # tokenizers' DecodeStream (Rust) does the windowed decoding where its text is decode()'s: not for
        # byte-fallback runs (their text can change as a run grows), nor where Tokenizer.decode post-processes.
        self._backend: Any = getattr(tokenizer, "backend", None)  # tokenizers.Tokenizer, or None in a test double
        self._use_stream = (
            self._backend is not None
            and self._bytes_kind != BYTE_FALLBACK
            and not getattr(tokenizer, "_clean_up", True)
            and (self.skip_special_tokens or self.spaces_between_special_tokens)
        )
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens) if self._use_stream else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens, self.spaces_between_special_tokens)

    def _unsettled_chars(self, token_id: int) -> int | None:
        """Characters at the end of the text that later tokens may still change, after adding token_id; None
        when the text so far is final and a new window may start after it."""
        self._new_text = False
        kind = self._bytes_kind
        if kind is None or token_id in self._dropped:
            return self._unsettled_chars_now()
        data = self._token_bytes(token_id)
        if kind == BYTE_LEVEL:
            if data is None:  # an added token: decoded on its own, it ends any partial character
                self._pending = b""
                return None
            if not self._pending and data.isascii():
                self._new_text = True
                return None
            data = self._pending + data
            text, consumed = codecs.utf_8_decode(data, "replace", False)
            self._pending = data[consumed:]
            self._new_text = bool(text)
            if self._pending and not _valid_incomplete_utf8(self._pending):
                self._pending = b""  # a surrogate or out-of-range lead: U+FFFDs now, whatever follows
                self._new_text = True
            return 1 if self._pending else None  # one U+FFFD stands for the incomplete character
        if data is None:  # byte fallback: a whole-text token closes the byte run
            self._pending = b""
            self._run_len = self._run_chars = 0
            self._run_invalid = False
            return None
        self._run_len += 1
        if not self._run_invalid:
            data = self._pending + data
            try:
                text, consumed = codecs.utf_8_decode(data, "strict", False)
            except UnicodeDecodeError:
                self._run_invalid = True
            else:
                self._run_chars += len(text)
                self._pending = data[consumed:]
                if self._pending and not _valid_incomplete_utf8(self._pending):
                    self._run_invalid = True
        return self._unsettled_chars_now()

    def _unsettled_chars_now(self) -> int | None:
        if self._bytes_kind == BYTE_LEVEL:
            return 1 if self._pending else None
        if self._bytes_kind == BYTE_FALLBACK and self._run_len:
            if self._run_invalid:
                return 0  # every byte of the run is one U+FFFD whatever follows, but the run is still open
            return self._run_len if self._pending else self._run_chars
        return None

    def add_token(self, token_id: int) -> str | None:
        """Append a token; returns the stop string if the text now contains one (the text is cut before it)."""
        self.ids.append(token_id)
        unsettled = self._unsettled_chars(token_id)
        if self._stopped:
            return None
        if self._stream is None:
            return self._step_and_restart_stream(unsettled)
        try:
            chunk = self._stream.step(self._backend, token_id)
        except Exception:  # DecodeStream refuses a text that does not extend its window's: decode here from now on
            self._stream = None
            self._use_stream = False
            return self._step(unsettled)
        if chunk is None:
            # DecodeStream waits whenever its text ends in U+FFFD; only an incomplete character may wait, so
            # text completed before it is shown here.
            if unsettled is not None and not self._new_text:
                return None
            return self._step_and_restart_stream(unsettled)
        delta = chunk[self._ahead :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._prefix_text = None
        self._ahead = 0
        self.text += delta
        return self._find_stop(len(delta)) if delta else None

    def _step_and_restart_stream(self, unsettled: int | None) -> str | None:
        """_step(); where the window moves on, DecodeStream starts again from it (left alone, its own window
        would grow for as long as its text ends in U+FFFD). It cannot start from a window whose text ends in
        U+FFFD: until a later window, decoding stays here."""
        read_offset = self.read_offset
        stop = self._step(unsettled)
        if self._use_stream and self.read_offset != read_offset:
            self._prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self._stream = None
            if not self._prefix_text.endswith("\ufffd"):
                self._stream = DecodeStream(
                    ids=self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special_tokens
                )
        return stop

    def _step(self, unsettled: int | None) -> str | None:
        """Show the settled new text of the window (two decodes); move the window past it when all is settled."""
        full = self._decode(self.ids[self.prefix_offset :])
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        prefix = self._prefix_text
        end = len(full) - (unsettled or 0)
        start = len(prefix) + self._ahead
        if end <= start or not full.startswith(prefix):
            return None
        delta = full[start:end]
        if unsettled is None:
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._prefix_text = None
            self._ahead = 0
        else:
            self._ahead = end - len(prefix)
        self.text += delta
        return self._find_stop(len(delta))

    def finish(self) -> str | None:
        """The request ended: show the text held back, so the text is decode(output ids). Returns a stop
        string found in that text (the text is then cut), else None."""
        if self._flushed or self._stopped:
            return None
        self._flushed = True
        final = self._decode(self.ids)
        if not final.startswith(self.text):
            # Only a decoder whose text of a prefix is not a prefix of its text gets here; the final text
            # still equals decode(), though what was streamed before was not a prefix of it.
            self.text = final
            return self._find_stop(len(final))
        delta_len = len(final) - len(self.text)
        self.text = final
        return self._find_stop(delta_len) if delta_len else None

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
        self._stopped = True
        return stop

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: while running, hold back what could still become the start of a stop string;
        once finished, all of it (see finish())."""
        if finished:
            self.finish()
            return self.text
        if self.max_stop_len <= 1 or self.include_stop:
            return self.text
        return self.text[: max(0, len(self.text) - self.max_stop_len + 1)]


# Second-byte range of a multi-byte UTF-8 character, by lead byte (Unicode table 3-7): E0 and F0 exclude
# overlong forms, ED surrogates, F4 code points past U+10FFFF.
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _valid_incomplete_utf8(data: bytes) -> bool:
    """Whether `data` (1 to 3 bytes) is the start of a valid UTF-8 character that more bytes could complete.

    Python's incremental decoder also waits on some starts that can never complete (ED A0: a surrogate);
    decode() renders those as U+FFFD at once."""
    lead = data[0]
    if 0xC2 <= lead <= 0xDF:
        length = 2
    elif 0xE0 <= lead <= 0xEF:
        length = 3
    elif 0xF0 <= lead <= 0xF4:
        length = 4
    else:
        return False
    if len(data) >= length:
        return False
    low, high = _SECOND_BYTE.get(lead, (0x80, 0xBF))
    if len(data) > 1 and not low <= data[1] <= high:
        return False
    return all(0x80 <= b <= 0xBF for b in data[2:])
