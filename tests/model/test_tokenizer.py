"""tokenmill's Tokenizer against transformers' AutoTokenizer on the same directory.

A tiny byte-level BPE tokenizer is trained here (no model hub), saved with several tokenizer_config.json
variants, and both tokenizers must agree on every encode / decode / apply_chat_template call.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from tokenmill.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>"]

# ChatML with a default system prompt, the bos_token variable, tools rendered with tojson, and
# raise_exception for an unknown role: the features real chat templates use.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello tokenizer. héllo wörld, naïve café.",
    "def main():\n    return 42  # the answer\n",
    "Paris is the capital of France. 世界 你好 🙂 emoji",
    "Numbers 1234567890 and symbols !@#$%^&*() in text.",
]

TEXTS = [
    "Hello world!",
    "héllo 世界 🙂",
    "  leading spaces and\ttabs\n\nnewlines  ",
    "<|im_start|>user\nhi<|im_end|>",
    "text with <tool_call> inside",
    "",
    "Numbers 12345 and émojis 🙂🙂",
]

MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "héllo 世界 🙂"},
]


def _train_tokenizer(post_processor_bos: bool) -> BackendTokenizer:
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    if post_processor_bos:
        bos_id = tok.token_to_id("<|im_start|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A",
            pair="<|im_start|> $A <|im_start|> $B",
            special_tokens=[("<|im_start|>", bos_id)],
        )
    return tok


# variant -> (bos added by tokenizer.json's post-processor, tokenizer_config.json additions)
VARIANTS = {
    # no post-processor, no add_bos_token: nothing added
    "plain": (False, {}),
    # tokenizer.json's own post-processor adds the bos token
    "post_processor": (True, {}),
    # transformers ignores add_bos_token in tokenizer_config.json when tokenizer.json exists: the
    # post-processor decides, in both directions
    "add_bos_token_ignored": (False, {"add_bos_token": True}),
    "add_bos_token_false_ignored": (True, {"add_bos_token": False}),
}


def _write_tokenizer_dir(path: Path, variant: str) -> Path:
    post_processor_bos, extra_config = VARIANTS[variant]
    path.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(post_processor_bos).save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<tool_call>"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        **extra_config,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return path


@pytest.fixture(scope="module", params=list(VARIANTS))
def tokenizer_pair(request, tmp_path_factory) -> tuple[Tokenizer, object]:
    path = _write_tokenizer_dir(tmp_path_factory.mktemp(f"tok-{request.param}"), request.param)
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return _write_tokenizer_dir(tmp_path_factory.mktemp("tok"), "plain")


def test_encode_matches_transformers(tokenizer_pair):
    ours, ref = tokenizer_pair
    for text in TEXTS:
        for add_special_tokens in (True, False):
            expected = ref.encode(text, add_special_tokens=add_special_tokens)
            assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, (
                text,
                add_special_tokens,
            )


def test_decode_matches_transformers(tokenizer_pair):
    ours, ref = tokenizer_pair
    for text in TEXTS:
        ids = ref.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    # Multi-byte UTF-8 survives the byte-level round trip.
    assert ours.decode(ours.encode("héllo 世界 🙂", add_special_tokens=False)) == "héllo 世界 🙂"


def test_vocabulary_and_special_ids_match_transformers(tokenizer_pair):
    ours, ref = tokenizer_pair
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert set(ours.all_special_ids) == set(ref.all_special_ids)
    assert ours.add_bos_token == (ref.encode("x")[0] == ref.bos_token_id)
    for token_id in (0, 3, 100, ours.vocab_size - 1):
        assert ours.id_to_token(token_id) == ref.convert_ids_to_tokens(token_id)


def test_eos_token_ids_merge_generation_config(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    # tokenizer eos <|im_end|> (2) plus generation_config.json's [2, 0]
    assert tok.eos_token_ids == frozenset({2, 0})


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer_pair, add_generation_prompt):
    ours, ref = tokenizer_pair
    expected = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_with_tools_and_extra_variables(tokenizer_dir):
    ours = Tokenizer.from_pretrained(tokenizer_dir)
    ref = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"city": "<str> & more"}}}
    ]
    # tojson must not HTML-escape "<" / "&" and must keep non-ASCII text.
    rendered = ours.apply_chat_template(MESSAGES, tools=tools)
    assert rendered == ref.apply_chat_template(
        MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert '"<str> & more"' in rendered

    template = (
        "{{ greeting }} {{ strftime_now('%Y') | length }}{% for m in messages %}|{{ m.content }}{% endfor %}"
    )
    ours_text = ours.apply_chat_template(MESSAGES[:1], chat_template=template, greeting="hi")
    ref_text = ref.apply_chat_template(MESSAGES[:1], chat_template=template, greeting="hi", tokenize=False)
    assert ours_text == ref_text == "hi 4|What is the capital of France?"


def test_chat_template_drops_none_fields_like_transformers(tokenizer_dir):
    ours = Tokenizer.from_pretrained(tokenizer_dir)
    template = "{% for m in messages %}{{ m.role }}:{{ 'content' in m }};{% endfor %}"
    messages = [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    assert ours.apply_chat_template(messages, chat_template=template) == "assistant:False;"


def test_chat_template_jinja_file_takes_precedence(tmp_path):
    path = _write_tokenizer_dir(tmp_path / "tok", "plain")
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    )
    ours = Tokenizer.from_pretrained(path)
    ref = transformers.AutoTokenizer.from_pretrained(path)
    expected = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert (
        ours.apply_chat_template(MESSAGES)
        == expected
        == "[user]What is the capital of France?[assistant]Paris.[user]héllo 世界 🙂"
    )


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_tokenizer_config_names_the_file(tmp_path):
    path = _write_tokenizer_dir(tmp_path / "tok", "plain")
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(path)


def test_no_chat_template_asks_for_one(tmp_path):
    path = _write_tokenizer_dir(tmp_path / "tok", "plain")
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(path)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template(MESSAGES)
    # An explicit template still works.
    assert (
        tok.apply_chat_template(MESSAGES[:1], chat_template="{{ messages[0].content }}")
        == MESSAGES[0]["content"]
    )


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "list"),
        ([], "empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\] has no 'content'"),
    ],
)
def test_invalid_messages_are_rejected(tokenizer_dir, messages, match):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_template_raise_exception_becomes_value_error(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ValueError, match="Unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_template_syntax_error_is_value_error(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ValueError, match="not valid jinja"):
        tok.apply_chat_template(MESSAGES, chat_template="{% for m in messages %}")


def test_sandbox_blocks_attribute_escapes(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ValueError, match="unsafe"):
        tok.apply_chat_template(MESSAGES, chat_template="{{ messages.__class__.__mro__ }}")


def test_unknown_token_id(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.id_to_token(tok.vocab_size + 5)


def test_wordpiece_cleanup_matches_transformers(tmp_path):
    """clean_up_tokenization_spaces applies to non-BPE models (here WordPiece), as in transformers."""
    tok = BackendTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)  # so the cleanup comes from tokenizer_config.json
    trainer = trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[UNK]", "[SEP]"], show_progress=False
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": True,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = Tokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["Hello world! It's the answer, isn't it?", "The quick brown fox."]:
        ids = ref.encode(text)
        assert ours.encode(text) == ids
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    ids = ours.encode("Hello world!")
    assert ours.backend.decode(ids) == "Hello world !" and ours.decode(ids) == "Hello world!"


def test_lone_surrogate_is_a_clear_value_error(tiny_tokenizer_dir):
    """Text that is not valid Unicode (a lone UTF-16 surrogate, as JSON "\\ud800" decodes) raises
    InvalidTextError (a ValueError) naming the position, not the tokenizers library's TypeError."""
    import pytest

    from tokenmill.model.tokenizer import InvalidTextError, Tokenizer

    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir)
    with pytest.raises(InvalidTextError, match=r"lone surrogate '\\ud800' at position 3.*valid UTF-8") as info:
        tok.encode("abc\ud800def")
    assert isinstance(info.value, ValueError)
    assert tok.encode("abc\U0001f600") == tok.encode("abc😀")  # a surrogate pair's character is fine
