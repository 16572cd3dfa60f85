"""Tool-call parsers, by vLLM's names (--tool-call-parser NAME): each extracts calls from generated text,
streamed or whole, and says how a call is written so that calls can be grammar-constrained."""

from __future__ import annotations

from tokenmill.entrypoints.openai.tool_parsers.abstract_tool_parser import (
    ExtractedToolCall,
    ExtractedToolCalls,
    TaggedJsonToolParser,
    ToolParser,
)
from tokenmill.entrypoints.openai.tool_parsers.hermes_tool_parser import HermesToolParser
from tokenmill.entrypoints.openai.tool_parsers.llama3_json_tool_parser import Llama3JsonToolParser

# --tool-call-parser name -> parser class.
TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as name; ValueError listing the names otherwise."""
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r}: use one of {', '.join(sorted(TOOL_PARSERS))}"
        ) from None


__all__ = [
    "TOOL_PARSERS",
    "ExtractedToolCall",
    "ExtractedToolCalls",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "TaggedJsonToolParser",
    "ToolParser",
    "get_tool_parser",
]
