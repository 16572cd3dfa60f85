"""Incremental detokenization is exact for multi-byte UTF-8 and never shows half characters."""

from __future__ import annotations

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.sampling_params import SamplingParams


def test_incremental_text_equals_full_decode(tiny_tokenizer_dir):
    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir)
    text = "héllo 世界 🙂 naïve façade 東京タワー ünïcödé end"
    prompt = tok.encode("Say:")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams())
    seen = []
    for t in ids:
        detok.add_token(t)
        seen.append(detok.text)
        assert "\ufffd" not in detok.text
    assert detok.text == tok.decode(ids)
    # Texts only grow.
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))


def test_stop_string_spanning_tokens_is_cut_and_held_back(tiny_tokenizer_dir):
    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = tok.encode("alpha beta STOPHERE gamma", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["STOPHERE"]))
    stop = None
    for t in ids:
        visible = detok.visible_text(finished=False)
        assert "STOP" not in visible
        stop = detok.add_token(t)
        if stop:
            break
    assert stop == "STOPHERE"
    assert detok.visible_text(finished=True) == "alpha beta "
