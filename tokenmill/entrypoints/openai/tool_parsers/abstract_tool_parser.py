"""The tool-parser contract, and the parser of formats that write each call as JSON between fixed strings.

A parser knows one model family's tool-call format. It
  - extracts calls from the generated text: extract(text, final) gives the content and the calls, with each
    call's arguments exactly as the model wrote them (raw JSON text);
  - says how a call is written (call_tag, separator, trigger), so that tool_choice "required", a named tool
    and the calls of "auto" can be grammar-constrained (structured_output/tool_calls.py).

Streaming and non-streaming use the same extract(): a stream extracts from the text so far (final=False) and
sends what grew since the last chunk. For a text that is a prefix of another, every call of the first has the
same name and its arguments are a prefix of the same call's in the second, and the content is a prefix too:
so the streamed calls, concatenated, are the non-streamed ones. Text that might still become a call (a partial
trigger) is held back until it is decided.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from tokenmill.structured_output.tool_calls import ToolCallTag


@dataclass
class ExtractedToolCall:
    name: str
    # The arguments' JSON text as generated; while streaming (or when max_tokens cut the call) a prefix of it.
    arguments: str
    # Whether the call's arguments are a complete JSON value.
    complete: bool = True


@dataclass
class ExtractedToolCalls:
    # The text outside the calls ("" when there is none, or only whitespace and separators).
    content: str
    tool_calls: list[ExtractedToolCall] = field(default_factory=list)


class ToolParser(ABC):
    """One tool-call format. Subclasses are registered by name in tool_parsers/__init__.py (vLLM's names)."""

    name: ClassVar[str]

    @abstractmethod
    def extract(self, text: str, final: bool) -> ExtractedToolCalls:
        """The content and calls in text. final=False: text may grow (streaming), so text that could still
        become part of a call is left out of the content."""

    @abstractmethod
    def call_tag(self, tool_name: str, parameters: dict) -> ToolCallTag:
        """How a call of this tool is written: begin string, arguments schema, end string."""

    # Written between two calls.
    separator: ClassVar[str]
    # The string that opens a call; in auto mode, what the model writes from it on is constrained.
    trigger: ClassVar[str]


class TaggedJsonToolParser(ToolParser):
    """Calls written as trigger, `{"name": "<tool>", "<arguments key>": {...}}`, end string.

    Whitespace between the JSON tokens of the head is allowed when parsing (models write either form), and the
    arguments key may be "arguments" or "parameters". Text outside the calls is content; text between or
    around calls made only of whitespace and the separator is not.
    """

    # Strings written around the JSON object of one call (before its "{" and after its "}").
    call_prefix: ClassVar[str]
    call_suffix: ClassVar[str]
    # The key of the arguments in the format the grammar enforces.
    arguments_key: ClassVar[str]
    # Markers dropped from the content wherever they appear (e.g. Llama 3's <|python_tag|>).
    ignored_markers: ClassVar[tuple[str, ...]] = ()

    def call_tag(self, tool_name: str, parameters: dict) -> ToolCallTag:
        head = f'{self.call_prefix}{{"name": {json.dumps(tool_name, ensure_ascii=False)}, "{self.arguments_key}": '
        return ToolCallTag(begin=head, schema=parameters, end="}" + self.call_suffix)

    def extract(self, text: str, final: bool) -> ExtractedToolCalls:
        segments: list[str] = []
        calls: list[ExtractedToolCall] = []
        pos = 0
        while True:
            start = text.find(self.trigger, pos)
            if start < 0:
                tail = text[pos:]
                if not final:
                    tail = tail[:len(tail) - _held_back(tail, (self.trigger, *self.ignored_markers))]
                segments.append(tail)
                break
            segments.append(text[pos:start])
            try:
                head = self._match_head(text, start)
            except _Incomplete:
                if final:  # the output ended inside the head: text
                    segments[-1] += text[start:]
                break
            if head is None:  # not a call after all: the trigger is text
                segments[-1] += self.trigger
                pos = start + len(self.trigger)
                continue
            name, args_start = head
            args_end = _json_value_end(text, args_start)
            if args_end is None:  # still generating the arguments (or cut by max_tokens)
                calls.append(ExtractedToolCall(name, text[args_start:], complete=False))
                break
            calls.append(ExtractedToolCall(name, text[args_start:args_end]))
            try:
                tail_end = _match_literals(text, args_end, ["}", *_literal_steps(self.call_suffix)])
            except _Incomplete:
                break
            pos = tail_end if tail_end is not None else args_end
        content = "".join(segment for segment in segments if not self._is_filler(segment))
        for marker in self.ignored_markers:
            content = content.replace(marker, "")
        return ExtractedToolCalls(content="" if not content.strip() else content, tool_calls=calls)

    def _is_filler(self, segment: str) -> bool:
        """Text around calls that is only whitespace and separators is not content."""
        return not segment.strip(" \t\r\n" + self.separator.strip())

    def _match_head(self, text: str, start: int) -> tuple[str, int] | None:
        """(tool name, where the arguments start), or None if this is not a call's head; _Incomplete if the
        text ends inside it."""
        end = _match_literals(text, start, [*_literal_steps(self.call_prefix), "{", '"name"', ":"])
        if end is None:
            return None
        end = _skip_ws(text, end)
        name_end = _json_string_end(text, end)
        if name_end is None:
            if end >= len(text) or text[end] == '"':
                raise _Incomplete
            return None
        try:
            name = json.loads(text[end:name_end])
        except json.JSONDecodeError:
            return None
        after_comma = _match_literals(text, name_end, [","])
        if after_comma is None:
            return None
        key_start = _skip_ws(text, after_comma)
        rest = text[key_start:key_start + len('"parameters"')]
        for key in _ARGUMENTS_KEYS:
            if rest.startswith(key):
                args = _match_literals(text, key_start + len(key), [":"])
                if args is None:
                    return None
                args = _skip_ws(text, args)
                if args >= len(text):
                    raise _Incomplete
                return name, args
        if key_start + len(rest) == len(text) and any(key.startswith(rest) for key in _ARGUMENTS_KEYS):
            raise _Incomplete
        return None


_ARGUMENTS_KEYS = ('"arguments"', '"parameters"')


class _Incomplete(Exception):
    """The text ends before what is being matched is decided (streaming: wait for more)."""


def _literal_steps(value: str) -> list[str]:
    """A fixed string as steps of _match_literals: its non-whitespace runs (whitespace there is flexible)."""
    return value.split()


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _match_literals(text: str, pos: int, literals: list[str]) -> int | None:
    """Match literals in order, whitespace allowed before each: the end, or None; _Incomplete if text ends
    first."""
    for literal in literals:
        pos = _skip_ws(text, pos)
        piece = text[pos:pos + len(literal)]
        if piece == literal:
            pos += len(literal)
        elif literal.startswith(piece) and pos + len(piece) == len(text):
            raise _Incomplete
        else:
            return None
    return pos


def _json_string_end(text: str, pos: int) -> int | None:
    """The index after the JSON string starting at pos, or None (not a string, or not closed yet)."""
    if pos >= len(text) or text[pos] != '"':
        return None
    i = pos + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    return None


def _json_value_end(text: str, pos: int) -> int | None:
    """The index after the JSON value starting at pos, or None if text ends before the value does.

    Brackets are counted outside strings; a scalar value ends at the first delimiter. Whether the value is
    valid JSON is not checked here (a constrained call always is).
    """
    if pos >= len(text):
        return None
    first = text[pos]
    if first == '"':
        return _json_string_end(text, pos)
    if first not in "{[":
        i = pos
        while i < len(text) and text[i] not in ",}] \t\r\n":
            i += 1
        return i if i < len(text) else None
    depth = 0
    i = pos
    while i < len(text):
        char = text[i]
        if char == '"':
            end = _json_string_end(text, i)
            if end is None:
                return None
            i = end
            continue
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of text could be the start of one of markers (held while streaming)."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest
