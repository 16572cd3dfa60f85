"""Grammars for tool calls: xgrammar structural tags that hold a model to one tool-call format.

A tool-call format (given by a tool parser, entrypoints/openai/tool_parsers/) writes each call as a begin string
naming the tool, the arguments as JSON, and an end string; calls are separated by a separator. From the tools'
parameter schemas this builds the StructuredOutputsParams that constrains:

  "required" / a named tool   the whole output is one call (or, with parallel_tool_calls, several calls) of
                              the given tools;
  "auto"                      free text, until the model writes the format's trigger (e.g. "<tool_call>"):
                              from there the call is constrained, so a call the model opens is always valid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from tokenmill.structured_output.params import DEFAULT_MAX_WHITESPACE, StructuredOutputsParams, close_schema


@dataclass(frozen=True)
class ToolCallTag:
    """One tool's call as the model writes it: begin, then its arguments (JSON matching schema), then end."""

    begin: str
    schema: dict[str, Any]
    end: str


def tool_call_structural_tag(
    tags: list[ToolCallTag],
    mode: Literal["auto", "required"],
    parallel: bool,
    separator: str,
    trigger: str | None = None,
    max_whitespace: int = DEFAULT_MAX_WHITESPACE,
) -> dict[str, Any]:
    """The structural tag (xgrammar's format) for calls of these tools.

    mode "required": the output is calls only, at least one (exactly one unless parallel). mode "auto": any
    text, in which each occurrence of trigger (a prefix of every begin) must continue as a call; unless
    parallel, the output ends after the first call.
    """
    if not tags:
        raise ValueError("tool_call_structural_tag needs at least one tool")
    items = [
        {
            "type": "tag",
            "begin": tag.begin,
            # Objects that list their properties admit no others (as for response_format schemas): the model
            # cannot invent arguments, and whitespace is bounded, so a bounded schema always finishes.
            "content": {"type": "json_schema", "json_schema": close_schema(tag.schema),
                        "max_whitespace_cnt": max_whitespace},
            "end": tag.end,
        }
        for tag in tags
    ]
    if mode == "auto":
        if trigger is None or not all(tag.begin.startswith(trigger) for tag in tags):
            raise ValueError(f"the trigger {trigger!r} must begin every tool call's begin string")
        fmt: dict[str, Any] = {"type": "triggered_tags", "triggers": [trigger], "tags": items,
                               "stop_after_first": not parallel}
    else:
        fmt = {"type": "tags_with_separator", "tags": items, "separator": separator, "at_least_one": True,
               "stop_after_first": not parallel}
    return {"type": "structural_tag", "format": fmt}


def tool_call_params(
    tags: list[ToolCallTag],
    mode: Literal["auto", "required"],
    parallel: bool,
    separator: str,
    trigger: str | None = None,
) -> StructuredOutputsParams:
    """StructuredOutputsParams with the structural tag of tool_call_structural_tag (compiled by xgrammar)."""
    tag = tool_call_structural_tag(tags, mode, parallel, separator, trigger)
    # Structural tags are xgrammar's: named here so a server whose default backend is guidance serves them.
    return StructuredOutputsParams(structural_tag=json.dumps(tag, ensure_ascii=False), backend="xgrammar")


__all__ = ["ToolCallTag", "tool_call_params", "tool_call_structural_tag"]
