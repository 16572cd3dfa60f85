"""Tool parsers on text alone: whole extraction, and streaming (extraction of every prefix) that never takes
back what it sent, so the streamed calls concatenate to the non-streamed ones."""

from __future__ import annotations

import pytest

from tokenmill.entrypoints.openai.tool_parsers import TOOL_PARSERS, get_tool_parser
from tokenmill.entrypoints.openai.tool_parsers.tool_calling import NamedArgumentsParser, ToolCallStream

HERMES_TWO_CALLS = (
    'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "n": [1, {"a": "}\\""}]}}\n'
    '</tool_call>\n<tool_call>\n{"name":"noop","arguments":{}}\n</tool_call>'
)


def streamed(parser, text: str, step: int = 1):
    """Stream text through a ToolCallStream in pieces of step characters: (content, [(name, arguments)])."""
    stream = ToolCallStream(parser)
    content = ""
    calls: dict[int, list[str]] = {}
    cuts = [*range(0, len(text), step), len(text)]
    for cut in cuts:
        delta, deltas, _ = stream.update(text[:cut], final=cut == len(text))
        content += delta or ""
        for d in deltas:
            if d.id is not None:
                assert d.index == len(calls) and d.type == "function" and d.function.name
                calls[d.index] = [d.function.name, d.function.arguments or ""]
            else:
                calls[d.index][1] += d.function.arguments or ""
    return content, [tuple(calls[i]) for i in sorted(calls)]


def whole(parser, text: str):
    extracted = parser.extract(text, final=True)
    return extracted.content, [(c.name, c.arguments) for c in extracted.tool_calls]


@pytest.mark.parametrize("name, text, content, calls", [
    ("hermes", HERMES_TWO_CALLS, "Let me check.",
     [("get_weather", '{"city": "Oslo", "n": [1, {"a": "}\\""}]}'), ("noop", "{}")]),
    ("hermes", "No call here, not even <tool_call> done right.", "No call here, not even <tool_call> done right.",
     []),
    ("hermes", '<tool_call>\n{"name": "f", "parameters": {"x": 1}}\n</tool_call>', "", [("f", '{"x": 1}')]),
    ("hermes", 'a <tool_call>\n{"name": "f", "arguments": {"x": [1, 2', "a ", [("f", '{"x": [1, 2')]),
    ("hermes", 'cut <tool_call>\n{"name": "f", "argu', 'cut <tool_call>\n{"name": "f", "argu', []),
    ("llama3_json", '{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}', "",
     [("f", '{"x": 1}'), ("g", "{}")]),
    ("llama3_json", '<|python_tag|>{"name": "f", "arguments": {"s": "a; b"}}', "", [("f", '{"s": "a; b"}')]),
    ("llama3_json", "Plain {text} answer", "Plain {text} answer", []),
], ids=["hermes-two", "hermes-text", "hermes-parameters-key", "hermes-cut-arguments", "hermes-cut-head",
        "llama-two", "llama-python-tag", "llama-text"])
def test_streamed_equals_whole(name, text, content, calls):
    parser = get_tool_parser(name)
    assert whole(parser, text) == (content, calls)
    for step in (1, 3, 7):
        assert streamed(parser, text, step) == (content, calls)


def test_a_partial_trigger_is_held_back_until_decided():
    hermes = get_tool_parser("hermes")
    assert hermes.extract("Hello <tool_", final=False).content == "Hello "
    assert hermes.extract("Hello <tool_", final=True).content == "Hello <tool_"
    assert hermes.extract("Hello <tool_x", final=False).content == "Hello <tool_x"


def test_named_arguments_parser():
    parser = NamedArgumentsParser("f")
    assert streamed(parser, '{"a": [1, "}"]}', 2) == ("", [("f", '{"a": [1, "}"]}')])
    assert not parser.extract('{"a": 1', final=True).tool_calls[0].complete


def test_registry_uses_vllm_names():
    assert {"hermes", "llama3_json"} <= set(TOOL_PARSERS)
    with pytest.raises(ValueError, match="unknown tool call parser 'nope': use one of"):
        get_tool_parser("nope")


PIECES = ["<tool_call>", "\n", "<tool_", '{"name": "f", "arguments": ', '{"name":"g","parameters":', '{"a": [1, "}"]}',
          '"x\\"y"', "}", "</tool_call>", "; ", "Hello", " ", "{", '"name"', "<|python_tag|>", "]"]


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_any_text_streams_as_it_extracts_whole(name):
    """Texts made of the formats' pieces in any order: streaming never takes back what it sent."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    parser = get_tool_parser(name)

    @settings(max_examples=80, deadline=None, database=None)
    @given(st.lists(st.sampled_from(PIECES), max_size=12), st.integers(1, 5))
    def check(pieces, step):
        text = "".join(pieces)
        assert streamed(parser, text, step) == whole(parser, text)

    check()


def test_server_flags_are_validated():
    from tokenmill.entrypoints.openai.server_config import ServerConfig

    ServerConfig(tool_call_parser="hermes", enable_auto_tool_choice=True).validate()
    with pytest.raises(ValueError, match="unknown tool call parser 'hermez': use one of hermes, llama3_json"):
        ServerConfig(tool_call_parser="hermez").validate()
    with pytest.raises(ValueError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        ServerConfig(enable_auto_tool_choice=True).validate()


def test_finish_reason_is_tool_calls_only_after_complete_calls():
    from tokenmill.entrypoints.openai.tool_parsers.tool_calling import finish_reason

    hermes = get_tool_parser("hermes")
    done = hermes.extract('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', final=True)
    cut = hermes.extract('<tool_call>\n{"name": "f", "arguments": {"a": ', final=True)
    assert finish_reason("stop", done) == "tool_calls"
    assert finish_reason("length", done) == "length"
    assert finish_reason("stop", cut) == "stop"
    assert finish_reason("stop", hermes.extract("text", final=True)) == "stop"
