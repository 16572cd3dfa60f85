"""Hermes / Qwen 2.5+ tool calls: `<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>`,
one block per call (newline-separated), after any text."""

from __future__ import annotations

from tokenmill.entrypoints.openai.tool_parsers.abstract_tool_parser import TaggedJsonToolParser


class HermesToolParser(TaggedJsonToolParser):
    name = "hermes"
    trigger = "<tool_call>"
    call_prefix = "<tool_call>\n"
    call_suffix = "\n</tool_call>"
    arguments_key = "arguments"
    separator = "\n"
