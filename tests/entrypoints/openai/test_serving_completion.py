"""The completions stream's per-token events, written from a template, against the pydantic models they replace."""

from __future__ import annotations

import pytest

from tokenmill.entrypoints.openai.protocol import CompletionResponseStreamChoice, CompletionStreamResponse
from tokenmill.entrypoints.openai.serving_completion import _State
from tokenmill.entrypoints.openai.serving_engine import Prompt, sse

TEXTS = ["", " hello", 'say "hi"\\', "line\nbreak\ttab\r\x00\x01\x1f\x7f\b\f", "héllo wörld ✓ 日本語 🙂",
         "\u2028\u2029", "\ufffd", "</script>", "{\"a\": 1}"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(("finish_reason", "stop_reason"),
                         [(None, None), ("length", None), ("stop", "END\n\"x\""), ("stop", 2), ("stop", "✓")])
@pytest.mark.parametrize(("request_id", "model_name", "index"),
                         [("cmpl-0123abcd", "tiny", 0), ("cmpl-9-3", 'my "mödel"/v1\\x', 17)])
def test_text_event_matches_the_pydantic_chunk_byte_for_byte(text, finish_reason, stop_reason, request_id,
                                                            model_name, index):
    state = _State(request_id, model_name, [Prompt(text="p", token_ids=[1])], 1, False)
    expected = sse(CompletionStreamResponse(
        id=request_id, created=state.created, model=model_name,
        choices=[CompletionResponseStreamChoice(index=index, text=text, logprobs=None, finish_reason=finish_reason,
                                                stop_reason=stop_reason)],
        usage=None,
    ).model_dump_json())
    assert state.text_event(index, text, finish_reason, stop_reason).encode() == expected.encode()
