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


# ---- text == decode(token ids), on random token sequences ------------------------------------------------------

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.tiny_models import build_sentencepiece_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp_tokenizer")
    build_sentencepiece_tokenizer(path)
    return Tokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def bpe_tokenizer(tiny_tokenizer_dir):
    return Tokenizer.from_pretrained(tiny_tokenizer_dir)


def _byte_token(tok: Tokenizer, byte: int) -> int:
    for token_id in range(tok.vocab_size):
        if tok.token_bytes(token_id) == bytes([byte]):
            return token_id
    raise AssertionError(f"no token for byte {byte:#x}")


def _stream(tok: Tokenizer, ids: list[int], params: SamplingParams) -> IncrementalDetokenizer:
    """Feed ids one by one, checking what is shown on the way against decode() of the tokens so far."""
    detok = IncrementalDetokenizer(tok, [1, 2, 3], params)
    shown = ""
    for i, token_id in enumerate(ids):
        assert detok.add_token(token_id) is None
        text = detok.visible_text(finished=False)
        assert text.startswith(shown)
        now = tok.decode(ids[: i + 1], params.skip_special_tokens, params.spaces_between_special_tokens)
        assert now.startswith(text), (now, text)
        held = now[len(text):]
        if tok.byte_decoding == "byte_level":
            # Only one valid but incomplete character may wait (one U+FFFD in decode's text).
            assert held in ("", "\ufffd"), (ids[: i + 1], held)
        elif held:
            # Only an open run of byte tokens, valid so far, may wait (tokens decode() drops do not close it).
            dropped = set(tok.all_special_ids) if params.skip_special_tokens else set()
            last = next(t for t in reversed(ids[: i + 1]) if t not in dropped)
            assert tok.token_bytes(last) is not None, (ids[: i + 1], held)
        shown = text
    return detok


@pytest.mark.parametrize("which", ["bpe_tokenizer", "sp_tokenizer"])
def test_random_tokens_text_equals_decode(which, request):
    tok = request.getfixturevalue(which)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ids=st.lists(st.integers(0, tok.vocab_size - 1), max_size=40), skip=st.booleans(), spaces=st.booleans())
    def check(ids, skip, spaces):
        params = SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
        detok = _stream(tok, ids, params)
        assert detok.visible_text(finished=True) == tok.decode(ids, skip, spaces)

    check()


@pytest.mark.parametrize("which", ["bpe_tokenizer", "sp_tokenizer"])
def test_random_byte_tokens_text_equals_decode(which, request):
    """Sequences dense in single-byte tokens: lead bytes, continuation bytes, invalid bytes, and text around."""
    tok = request.getfixturevalue(which)
    byte_ids = [_byte_token(tok, b) for b in range(256)]
    words = tok.encode(" the quick 世界", add_special_tokens=False)
    special = tok.all_special_ids

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        ids=st.lists(st.one_of(st.sampled_from(byte_ids), st.sampled_from(words), st.sampled_from(special)),
                     max_size=30),
        skip=st.booleans(),
    )
    def check(ids, skip):
        detok = _stream(tok, ids, SamplingParams(skip_special_tokens=skip))
        assert detok.visible_text(finished=True) == tok.decode(ids, skip_special_tokens=skip)

    check()


@pytest.mark.parametrize("which", ["bpe_tokenizer", "sp_tokenizer"])
def test_invalid_bytes_come_out_at_once(which, request):
    """Lone continuation bytes and a lead byte followed by a non-continuation are U+FFFD at once; the text of
    a request made of them is never empty."""
    tok = request.getfixturevalue(which)
    b = {x: _byte_token(tok, x) for x in (0x80, 0xBF, 0xE4, 0xB8, 0xAD, 0x41)}
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    detok.add_token(b[0x80])
    detok.add_token(b[0xBF])
    assert detok.visible_text(finished=False) == "\ufffd\ufffd"
    ids = [b[0x80], b[0xBF], b[0xE4], b[0x41]]
    detok.add_token(b[0xE4])  # a valid lead byte: may wait for its continuation
    detok.add_token(b[0x41])  # not a continuation: the lead byte is invalid
    assert detok.visible_text(finished=True) == tok.decode(ids) != ""
    # ByteFallback renders a run of byte tokens holding an invalid byte as one U+FFFD per byte, "A" included.
    assert detok.text == ("\ufffd\ufffd\ufffdA" if which == "bpe_tokenizer" else "\ufffd" * 4)


def test_complete_character_from_bytes_waits_only_until_complete(bpe_tokenizer):
    tok = bpe_tokenizer
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    for byte in "中".encode():
        assert detok.visible_text(finished=False) == ""
        detok.add_token(_byte_token(tok, byte))
    assert detok.visible_text(finished=False) == "中"


def test_no_prompt_context_in_text(sp_tokenizer):
    """The first output token's text is decode()'s, whatever the prompt (SentencePiece strips its space)."""
    tok = sp_tokenizer
    ids = tok.encode("the quick", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"), SamplingParams())
    for token_id in ids:
        detok.add_token(token_id)
    assert detok.visible_text(finished=True) == tok.decode(ids) == "the quick"


def test_spaces_between_special_tokens(tmp_path):
    """spaces_between_special_tokens=False drops the separator a decoder puts between consecutive added
    tokens (here: a tokenizer without decoder joins every token with a space), as vLLM does."""
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken("<a>", special=True), AddedToken("<b>", special=True)])
    tok = Tokenizer(backend)
    a, b_ = backend.token_to_id("<a>"), backend.token_to_id("<b>")
    ids = [0, a, b_, a, 1]
    assert tok.decode(ids, skip_special_tokens=False) == "hello <a> <b> <a> world"
    assert tok.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=False) == "hello <a><b><a> world"
    assert tok.decode(ids, skip_special_tokens=True, spaces_between_special_tokens=False) == "hello world"
    for spaces in (True, False):
        params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=spaces)
        detok = _stream(tok, ids, params)
        assert detok.visible_text(finished=True) == tok.decode(ids, False, spaces)


def test_surrogate_and_overlong_starts_come_out_at_once(bpe_tokenizer):
    """ED A0 starts a UTF-16 surrogate and E0 80 an overlong form: no byte can complete them (Python's own
    incremental decoder would still wait on them)."""
    tok = bpe_tokenizer
    for first, second in ((0xED, 0xA0), (0xE0, 0x80), (0xF4, 0x90)):
        ids = [_byte_token(tok, first), _byte_token(tok, second)]
        detok = IncrementalDetokenizer(tok, [], SamplingParams())
        for token_id in ids:
            detok.add_token(token_id)
        assert detok.visible_text(finished=False) == tok.decode(ids) == "\ufffd\ufffd"
