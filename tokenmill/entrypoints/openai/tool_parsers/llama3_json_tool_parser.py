"""Llama 3.x JSON tool calls: `{"name": "get_weather", "parameters": {"city": "Oslo"}}`, several separated by
"; ", optionally after <|python_tag|> (a special token, dropped from the text unless skip_special_tokens=False;
dropped from the content either way)."""

from __future__ import annotations

from tokenmill.entrypoints.openai.tool_parsers.abstract_tool_parser import TaggedJsonToolParser


class Llama3JsonToolParser(TaggedJsonToolParser):
    name = "llama3_json"
    trigger = '{"name"'
    call_prefix = ""
    call_suffix = ""
    arguments_key = "parameters"
    separator = "; "
    ignored_markers = ("<|python_tag|>",)
